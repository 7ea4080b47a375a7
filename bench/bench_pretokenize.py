"""
Pretokenize throughput on the shared TinyStories sample (~0.9 M tokens with the Llama 2 vocabulary),
whole process, start-up included: `python tinystories.py pretokenize --vocab_size 0` against a
llama2.c-style baseline (sequential, one sp.encode per story, a Python list turned into np.uint16),
both run as subprocesses on the same unpacked copy, side by side. Run by hand, not a test:

    python bench/bench_pretokenize.py [--repeats 5] [--json results.json]
    python bench/bench_pretokenize.py --peer ../llama2.c     # against llama2.c's own pretokenize

With --peer (a llama2.c checkout beside the project; nothing of it is copied here) the other side is
llama2.c's own `python tinystories.py pretokenize --vocab_size=0` (its process pool and all), run in a
folder of its own with a copy of the same sample and the same tokenizer; without it, the llama2.c-style
baseline below, labelled as such.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LLAMA_SHARED_DIR", ROOT.parent / "shared"))

# llama2.c's per-story loop, written out (its process pool and torch import left aside)
BASELINE = """
import glob, json, os, sys
import numpy as np
import sentencepiece as spm
src, model, out = sys.argv[1:]
sp = spm.SentencePieceProcessor(model_file=model)
for path in sorted(glob.glob(os.path.join(src, "data*.json"))):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    all_tokens = []
    for example in data:
        tokens = sp.encode(example["story"].strip())
        tokens.insert(0, sp.bos_id())
        all_tokens.extend(tokens)
    name = os.path.basename(path).replace(".json", ".bin")
    np.array(all_tokens, dtype=np.uint16).tofile(os.path.join(out, name))
"""


def timed(cmd: list[str], repeats: int, cwd=None) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command; the median is reported")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--peer", help="a llama2.c checkout: time its own pretokenize (see above)")
    args = parser.parse_args()
    if args.peer and not (Path(args.peer) / "tinystories.py").is_file():
        sys.exit(f"error: --peer {args.peer} is not a llama2.c checkout (no tinystories.py there)")
    sample = SHARED / "data" / "tinystories" / "TinyStories_all_data_sample.tar.gz"
    model = SHARED / "tokenizers" / "llama2.model"
    if not sample.exists() or not model.exists():
        sys.exit(f"error: needs {sample} and {model} (set LLAMA_SHARED_DIR)")

    with tempfile.TemporaryDirectory() as tmp:
        data, base_out = Path(tmp) / "data", Path(tmp) / "baseline"
        src = data / "TinyStories_all_data"
        with tarfile.open(sample) as tar:
            tar.extractall(src, filter="data")
        shutil.copy(model, data / "llama2_tokenizer.model")
        base_out.mkdir()
        ours_cmd = [sys.executable, str(ROOT / "tinystories.py"), "pretokenize", "--vocab_size", "0",
                    "--data_dir", str(data)]
        base_cmd, base_cwd = [sys.executable, "-c", BASELINE, str(src), str(model), str(base_out)], None
        if args.peer:  # llama2.c reads data/TinyStories_all_data and tokenizer.model from its working folder
            base_cwd = Path(tmp) / "peer"
            base_out = base_cwd / "data" / "TinyStories_all_data"
            shutil.copytree(src, base_out)
            shutil.copy(model, base_cwd / "tokenizer.model")
            base_cmd = [sys.executable, str(Path(args.peer) / "tinystories.py"), "pretokenize",
                        "--vocab_size=0"]
        base_name = "llama2.c's tinystories.py pretokenize" if args.peer else \
            "llama2.c-style per-story baseline"
        # alternate the two so that load from other processes on the machine hits both alike
        ours, base = [], []
        for _ in range(args.repeats):
            ours += timed(ours_cmd, 1)
            base += timed(base_cmd, 1, base_cwd)
        meta = json.loads((src / "meta.json").read_text(encoding="utf-8"))
        tokens = meta["num_tokens"]
        shards = sorted(src.glob("data*.bin"))
        identical = all(np.array_equal(np.fromfile(p, np.uint16), np.fromfile(base_out / p.name, np.uint16))
                        for p in shards)

    t_ours, t_base = statistics.median(ours), statistics.median(base)
    result = {
        "tokens": tokens, "stories": meta["num_stories"], "cpus": os.cpu_count(), "repeats": args.repeats,
        "ours_s": t_ours, "ours_tok_s": tokens / t_ours,
        "baseline_s": t_base, "baseline_tok_s": tokens / t_base,
        "baseline": base_name, "speedup_vs_baseline": t_base / t_ours, "outputs_identical": identical,
    }
    print(f"pretokenize, TinyStories sample: {meta['num_stories']:,} stories, {tokens:,} tokens, "
          f"{os.cpu_count()} CPUs, whole process, median of {args.repeats}")
    print(f"  tinystories.py pretokenize --vocab_size 0  {t_ours:6.2f} s  "
          f"{tokens / t_ours / 1e6:5.2f} M tokens/s   (runs: {', '.join(f'{t:.2f}' for t in ours)})")
    print(f"  {base_name:<42} {t_base:6.2f} s  "
          f"{tokens / t_base / 1e6:5.2f} M tokens/s   (runs: {', '.join(f'{t:.2f}' for t in base)})")
    print(f"  {t_base / t_ours:.2f}x ({base_name}, same run); same tokens: {'yes' if identical else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
