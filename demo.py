"""
The offline quick start: the whole pipeline on CPU in a few minutes, with no download.

    python demo.py                          # data/fixture/, out/debug/, then two stories
    python demo.py --max_iters=100          # any --key=value goes to train.py (a shorter run here)
    python demo.py --data_dir=/tmp/d --out_dir=/tmp/o   # somewhere else than ./data and ./out/debug
    python demo.py --init_from=resume --max_iters=1000  # train the last demo's model further

It generates a small synthetic story corpus (llamatiny/corpus.py), fits a 512-token
vocabulary to it, tokenizes it, trains config/train_cpu_debug.py and samples two stories, printing
each command before running it, so you can rerun any step by hand. Run again, it makes the same data
and trains a new model in place of the last one (train.py --overwrite=True, which keeps the last run in
out/debug/replaced/ until the new one's first checkpoint). The real thing is the same commands with
`tinystories.py download` / `pretokenize` and a GPU config: see README.md.
"""
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))


def run(*args: str) -> None:
    cmd = [sys.executable, *args]
    print(f"\n$ {shlex.join(['python', *args])}", flush=True)
    t0 = time.time()
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        sys.exit(f"error: the step above failed; rerun it by hand from {ROOT} to see why")
    print(f"({time.time() - t0:.0f} s)", flush=True)


def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):
        print(__doc__.strip())
        return
    bad = [a for a in argv if not (a.startswith("--") and "=" in a)]
    if bad:
        sys.exit(f"error: demo.py takes only --key=value settings for train.py, not {bad[0]!r}")
    settings = dict(a[2:].split("=", 1) for a in argv)
    data_dir, out_dir = settings.get("data_dir", "data"), settings.get("out_dir", "out/debug")
    stories = os.path.join(data_dir, "fixture_stories.txt")
    run("-m", "llamatiny.corpus", stories, "--num_stories", "5000")
    run("tinystories.py", "train_vocab", "--input", stories, "--name", "fixture", "--vocab_size", "512",
        "--data_dir", data_dir)
    run("tinystories.py", "prepare", "--input", stories, "--name", "fixture", "--vocab_size", "512",
        "--data_dir", data_dir)
    run("train.py", "config/train_cpu_debug.py", "--overwrite=True", *argv)  # (yours come last, and win)
    run("sample.py", f"--checkpoint={out_dir}/ckpt.pt", "--prompt=Once upon a time", "--max_new_tokens=200",
        "--temperature=0.8", "--num_samples=2")
    print("\nDone. Next: the full TinyStories run on a GPU (README.md, 'Quick start').")


if __name__ == "__main__":
    main(sys.argv[1:])
