"""
What instruction tuning buys, on real TinyStories: a 260K-shaped model (config/train_260k.py's shape, its
own 512-token vocabulary) pretrained on the shared sample's training stories, then tuned on Words:
instructions made from the same stories (`prepare --words_from_story=3`). Both models are measured on
the sample's validation stories, which neither has seen: how often the story written for "Words: a, b, c"
uses all three words (and what share of the requested words it uses), and the bits per byte on the plain
stories, the cost of the tuning to plain story writing.

    python bench/bench_sft.py                                   # ../shared beside the repository
    python bench/bench_sft.py --shared PATH --work /tmp/sft --pretrain_iters 3000 --tune_iters 1500

Every step is the project's own command line (printed as it runs), in --work: train_vocab, prepare (plain
and Words: data), train.py twice; then eval.py four times, in this process. Greedy generation, 100 new
tokens at most.
"""
import argparse
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import eval as evaluation  # noqa: E402  (the repository's eval.py)

SHAPE = ["--dim=64", "--n_layers=5", "--n_heads=8", "--n_kv_heads=4", "--multiple_of=4", "--vocab_size=512",
         "--vocab_source=custom"]


def run(cmd: list[str], cwd: str) -> str:
    print("$ " + shlex.join(cmd), flush=True)
    result = subprocess.run([sys.executable, *cmd], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {shlex.join(cmd)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result.stdout


def evaluate(ckpt: str, data: str, args, words: bool) -> dict:
    extra = ["--words_from_story=3", f"--max_records={args.records}", "--max_new_tokens=100"] if words else \
            ["--format=text"]
    argv = [f"--checkpoint={ckpt}", f"--input={data}", "--device=cpu", *extra]
    print("$ python eval.py " + shlex.join(argv), flush=True)
    return evaluation.main(argv)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"),
                   help="the folder holding data/tinystories")
    p.add_argument("--work", default="/tmp/bench_sft", help="data and runs go here")
    p.add_argument("--pretrain_iters", type=int, default=2000)
    p.add_argument("--tune_iters", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=32, help="sequences of 256 tokens per iteration")
    p.add_argument("--records", type=int, default=200, help="validation stories to generate for")
    args = p.parse_args()
    src = os.path.join(os.path.abspath(args.shared), "data", "tinystories")
    train_txt, valid_txt = os.path.join(src, "sample-train.txt"), os.path.join(src, "sample-valid.txt")
    if not os.path.isfile(train_txt):
        sys.exit(f"no {train_txt}: pass --shared PATH, the folder that holds data/tinystories")
    os.makedirs(args.work, exist_ok=True)
    w = lambda *parts: os.path.join(args.work, *parts)
    t0 = time.time()

    run(["tinystories.py", "train_vocab", f"--data_dir={w('data')}", "--input", train_txt, "--name", "plain",
         "--vocab_size", "512"], ROOT)
    tok = w("data", "plain", "tok512.model")
    run(["tinystories.py", "prepare", f"--data_dir={w('data')}", "--input", train_txt, "--name", "plain",
         "--tokenizer", tok], ROOT)
    run(["tinystories.py", "prepare", f"--data_dir={w('data')}", "--input", train_txt, "--name", "words",
         "--tokenizer", tok, "--words_from_story", "3"], ROOT)
    common = [*SHAPE, "--max_seq_len=256", f"--batch_size={args.batch_size}",
              "--gradient_accumulation_steps=1", "--dropout=0.0", "--compile=False", "--device=cpu",
              f"--data_dir={w('data')}", "--eval_iters=10", "--log_interval=100", "--overwrite=True"]
    run(["train.py", *common, "--dataset=plain", "--learning_rate=2e-3", "--warmup_iters=100",
         f"--max_iters={args.pretrain_iters}", f"--eval_interval={args.pretrain_iters}",
         f"--out_dir={w('base')}"], ROOT)
    run(["train.py", *common, "--dataset=words", "--learning_rate=1e-3", "--warmup_iters=50",
         f"--max_iters={args.tune_iters}", f"--eval_interval={args.tune_iters}",
         f"--init_from={w('base', 'ckpt.pt')}", f"--out_dir={w('tuned')}"], ROOT)

    scores = {name: (evaluate(w(name, "ckpt.pt"), valid_txt, args, words=True),
                     evaluate(w(name, "ckpt.pt"), valid_txt, args, words=False))
              for name in ("base", "tuned")}
    print(f"\n260K shape, {args.pretrain_iters} pretraining + {args.tune_iters} tuning iterations "
          f"of {args.batch_size} x 256 tokens; {args.records} validation stories "
          f"({time.time() - t0:.0f} s in all)\n")
    print("| model | Words: constraints met | requested words used | loss on the responses | "
          "plain validation stories, bits per byte |")
    print("| --- | --- | --- | --- | --- |")
    for name, (words, plain) in scores.items():
        print(f"| {name} | {words['words_share']:.1%} | {words['words_used_share']:.1%} | "
              f"{words['loss']:.3f} | {plain['bits_per_byte']:.4f} |")


if __name__ == "__main__":
    main()
