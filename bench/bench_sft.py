"""
What instruction tuning buys, on real TinyStories: a 260K-shaped model (config/train_260k.py's shape, its
own 512-token vocabulary) pretrained on the shared sample's training stories, then tuned on Words:
instructions made from the same stories (`prepare --words_from_story=3`). Every model is measured on the
sample's validation stories, which none has seen: how often the story written for "Words: a, b, c" uses
all three words (and what share of the requested words it uses), the loss on those stories as responses,
and the bits per byte on the plain stories (the cost of the tuning to plain story writing). The base model
is also measured unprompted: the story it writes from BOS alone, scored against every request, is how
often it uses the words anyway.

    python bench/bench_sft.py                                   # ../shared beside the repository
    python bench/bench_sft.py --before 07cf3c9                  # also tune with that revision's train.py
    python bench/bench_sft.py --shared PATH --work /tmp/sft --pretrain_iters 3000 --tune_iters 1500
    python bench/bench_sft.py --reuse_base --tune_lr 3e-3        # tune again on the last run's base

--before REV tunes a second model from the same base on the same data for the same steps with the training
code of git revision REV (unpacked with `git archive` into --work), so that a change to the loader or the
loss is measured side by side in one run. Every step is the project's own command line (printed as it
runs), in --work: train_vocab, prepare (plain and Words: data), train.py for the base and each tuning;
then eval.py in this process. Greedy generation, 100 new tokens at most.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


import eval as evaluation  # noqa: E402  (the repository's eval.py)
from llamatiny import generate, instruct, runtime  # noqa: E402
from llamatiny.readers import InputRecords  # noqa: E402

SHAPE = ["--dim=64", "--n_layers=5", "--n_heads=8", "--n_kv_heads=4", "--multiple_of=4", "--vocab_size=512",
         "--vocab_source=custom"]
NEW_TOKENS = 100


def run(cmd: list[str], cwd: str) -> str:
    print("$ " + shlex.join(cmd), flush=True)
    result = subprocess.run([sys.executable, *cmd], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {shlex.join(cmd)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result.stdout


def evaluate(ckpt: str, data: str, args, words: bool) -> dict:
    extra = ["--words_from_story=3", f"--max_records={args.records}", f"--max_new_tokens={NEW_TOKENS}"] \
        if words else ["--format=text"]
    argv = [f"--checkpoint={ckpt}", f"--input={data}", "--device=cpu", *extra]
    print("$ python eval.py " + shlex.join(argv), flush=True)
    return evaluation.main(argv)


def unprompted(ckpt: str, data: str, args) -> dict:
    # the story the model writes from BOS alone (greedy: one story), scored against each Words: request
    model, checkpoint = generate.load_model(ckpt, "cpu")
    tok = generate.load_tokenizer({"tokenizer": "", "checkpoint": ckpt}, checkpoint, model.args.vocab_size)
    cfg = {"max_new_tokens": NEW_TOKENS, "temperature": 0.0, "top_k": None, "top_p": None}
    story = tok.decode(generate.generate_story(model.eval(), tok, [tok.bos_id], cfg, write=lambda t: None,
                                               echo=False))
    records = zip(InputRecords(data, "text", 3), range(args.records))
    requests = [instruct.requested_words(r) for r, _ in records]
    used = sum(instruct.words_met([w], story) for words in requests for w in words)
    print(f"unprompted story of {ckpt}: {story[:200]!r}...")
    return {"words_share": sum(instruct.words_met(words, story) for words in requests) / len(requests),
            "words_used_share": used / sum(map(len, requests))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"),
                   help="the folder holding data/tinystories")
    p.add_argument("--work", default="/tmp/bench_sft", help="data and runs go here")
    p.add_argument("--pretrain_iters", type=int, default=2000)
    p.add_argument("--tune_iters", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=32, help="sequences per iteration")
    p.add_argument("--max_seq_len", type=int, default=256)
    p.add_argument("--tune_lr", type=float, default=1e-3, help="the tuning's peak learning rate")
    p.add_argument("--records", type=int, default=200, help="validation stories to generate for")
    p.add_argument("--before", metavar="REV", help="also tune with the train.py of this git revision")
    p.add_argument("--reuse_base", action="store_true",
                   help="keep the data and the base model of an earlier run in --work: tune and measure only")
    args = p.parse_args()
    runtime.use_cpu_threads(None)  # eval.py's, in this process: train.py's choice
    src = os.path.join(os.path.abspath(args.shared), "data", "tinystories")
    train_txt, valid_txt = os.path.join(src, "sample-train.txt"), os.path.join(src, "sample-valid.txt")
    if not os.path.isfile(train_txt):
        sys.exit(f"no {train_txt}: pass --shared PATH, the folder that holds data/tinystories")
    os.makedirs(args.work, exist_ok=True)
    w = lambda *parts: os.path.join(args.work, *parts)
    t0 = time.time()

    tuned = {"tuned": ROOT}  # name -> the checkout whose train.py tunes it
    if args.before:
        tuned = {f"tuned with {args.before}'s train.py": w(f"code_{args.before}"), **tuned}
        os.makedirs(w(f"code_{args.before}"), exist_ok=True)
        archive = subprocess.run(["git", "-C", ROOT, "archive", args.before], capture_output=True)
        if archive.returncode != 0:
            sys.exit(f"git archive {args.before}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", w(f"code_{args.before}")], input=archive.stdout, check=True)

    common = [*SHAPE, f"--max_seq_len={args.max_seq_len}", f"--batch_size={args.batch_size}",
              "--gradient_accumulation_steps=1", "--dropout=0.0", "--compile=False", "--device=cpu",
              f"--data_dir={w('data')}", "--eval_iters=10", "--log_interval=100", "--overwrite=True"]
    if not args.reuse_base:
        run(["tinystories.py", "train_vocab", f"--data_dir={w('data')}", "--input", train_txt, "--name",
             "plain", "--vocab_size", "512"], ROOT)
        tok = w("data", "plain", "tok512.model")
        run(["tinystories.py", "prepare", f"--data_dir={w('data')}", "--input", train_txt, "--name", "plain",
             "--tokenizer", tok], ROOT)
        run(["tinystories.py", "prepare", f"--data_dir={w('data')}", "--input", train_txt, "--name", "words",
             "--tokenizer", tok, "--words_from_story", "3"], ROOT)
        run(["train.py", *common, "--dataset=plain", "--learning_rate=2e-3", "--warmup_iters=100",
             f"--max_iters={args.pretrain_iters}", f"--eval_interval={args.pretrain_iters}",
             f"--out_dir={w('base')}"], ROOT)
    elif not os.path.isfile(w("base", "ckpt.pt")):
        sys.exit(f"--reuse_base: no {w('base', 'ckpt.pt')}; run once without it")
    with open(w("base", "metrics.jsonl"), encoding="utf-8") as f:
        pretrained = json.loads(f.readlines()[-1])["iter"]  # (a reused base's own length)
    for name, code in tuned.items():
        out = w("tuned" if code == ROOT else f"tuned_{args.before}")
        run([os.path.join(code, "train.py"), *common, "--dataset=words", f"--learning_rate={args.tune_lr}",
             "--warmup_iters=50", f"--max_iters={args.tune_iters}", f"--eval_interval={args.tune_iters}",
             f"--init_from={w('base', 'ckpt.pt')}", f"--out_dir={out}"], code)
        tuned[name] = os.path.join(out, "ckpt.pt")

    checkpoints = {"base": w("base", "ckpt.pt"), **tuned}
    scores = {name: [evaluate(ckpt, valid_txt, args, words) for words in (True, False)]
              for name, ckpt in checkpoints.items()}
    anyway = unprompted(checkpoints["base"], valid_txt, args)
    print(f"\n260K shape, {pretrained} pretraining + {args.tune_iters} tuning iterations "
          f"of {args.batch_size} x {args.max_seq_len} tokens (tuning lr {args.tune_lr:g}); {args.records} "
          f"validation stories ({time.time() - t0:.0f} s in all)\n")
    print("| model | Words: constraints met | requested words used | loss on the responses | "
          "plain validation stories, bits per byte |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| base, unprompted | {anyway['words_share']:.1%} | {anyway['words_used_share']:.1%} | | |")
    for name, (words, plain) in scores.items():
        print(f"| {name} | {words['words_share']:.1%} | {words['words_used_share']:.1%} | "
              f"{words['loss']:.3f} | {plain['bits_per_byte']:.4f} |")
    for name in tuned:
        ratio = scores[name][0]["words_used_share"] / max(anyway["words_used_share"], 1e-9)
        print(f"{name}: {ratio:.2f}x the requested words the base model uses unprompted")


if __name__ == "__main__":
    main()
