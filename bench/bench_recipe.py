"""
Two training recipes side by side on real TinyStories: llama2.c's (AdamW, cosine decay: the settings of its
config for the size) and ours (Muon for the blocks' matrices, AdamW for the embedding and the norms,
warmup-stable-decay), on the same data, seed and context, each at several token budgets, measured in bits per
byte on stories no run trained on.

    python bench/bench_recipe.py                                  # 260K shapes: 1M and 2M tokens
    python bench/bench_recipe.py --size 15m --budgets 0.5e6       # 15M shapes, Llama 2 vocabulary
    python bench/bench_recipe.py --tune --recipes new --new=--muon_lr=0.03   # choosing a setting

The reported figures train on the shared sample's training stories (sample-train.txt) and are measured on
its validation stories (sample-valid.txt, the official validation split). --tune chooses settings without
looking at those: the runs train on nine training stories in ten and are measured on the tenth. The 260K
shapes get a 512-token vocabulary fitted to the stories they train on; the 15M shapes the Llama 2 one.
Every run is train.train() in this process (its log in --work/NAME.log), each budget a run of its own (a
schedule is set by its length), then eval.py's bits per byte on the held-out stories.
"""
import argparse
import contextlib
import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


import eval as evaluation  # noqa: E402  (the repository's eval.py)
import tinystories  # noqa: E402
import train  # noqa: E402

SHAPES = {
    "260k": ["--dim=64", "--n_layers=5", "--n_heads=8", "--n_kv_heads=4", "--multiple_of=4",
             "--vocab_source=custom", "--vocab_size=512"],
    "15m": ["--dim=288", "--n_layers=6", "--n_heads=6", "--n_kv_heads=6", "--multiple_of=32",
            "--vocab_source=llama2", "--vocab_size=32000"],
}
# llama2.c's recipes (config/train_260k.py and train_15m.py with --optimizer=adamw --lr_schedule=cosine):
# its learning rate, betas, weight decay and dropout, decay to 0, warmup over 1% of the run as its 1,000 of
# 100,000 iterations. Its batches (65,536 and 131,072 tokens) would leave these budgets a few dozen steps:
# here it takes ours, 4 x 256 (1,024 tokens) per iteration: both make the same steps (--old changes it).
OLD = {
    "260k": ["--optimizer=adamw", "--lr_schedule=cosine", "--learning_rate=1e-3", "--min_lr=0",
             "--beta2=0.99", "--weight_decay=0.01", "--dropout=0.05", "--batch_size=4"],
    "15m": ["--optimizer=adamw", "--lr_schedule=cosine", "--learning_rate=5e-4", "--min_lr=0",
            "--beta2=0.95", "--weight_decay=0.1", "--dropout=0.0", "--batch_size=4"],
}
OLD_WARMUP = 0.01
# ours: the learning rates chosen on --tune runs (muon_lr at the 15M shapes; bench/README.md)
NEW = {
    "260k": ["--optimizer=muon", "--lr_schedule=wsd", "--muon_lr=0.01", "--learning_rate=1e-2", "--min_lr=0",
             "--beta2=0.99", "--weight_decay=0.0", "--dropout=0.0", "--batch_size=4"],
    "15m": ["--optimizer=muon", "--lr_schedule=wsd", "--muon_lr=0.01", "--learning_rate=5e-3", "--min_lr=0",
            "--beta2=0.95", "--weight_decay=0.0", "--dropout=0.0", "--batch_size=4"],
}
NEW_WARMUP = 0.02


def split_stories(path: str, out_dir: str) -> tuple[str, str]:
    # --tune: nine stories in ten to train on, the tenth to measure on
    with open(path, encoding="utf-8") as f:
        stories = [s.strip() for s in f.read().split("<|endoftext|>") if s.strip()]
    files = (os.path.join(out_dir, "tune-train.txt"), os.path.join(out_dir, "tune-valid.txt"))
    for name, keep in zip(files, (lambda i: i % 10 != 9, lambda i: i % 10 == 9)):
        with open(name, "w", encoding="utf-8") as f:
            f.writelines(s + "\n<|endoftext|>\n" for i, s in enumerate(stories) if keep(i))
    return files


def prepare(args) -> tuple[str, str]:
    """The shards to train on (--work/data/stories) and the text to measure on."""
    src = os.path.join(os.path.abspath(args.shared), "data", "tinystories")
    train_txt, valid_txt = os.path.join(src, "sample-train.txt"), os.path.join(src, "sample-valid.txt")
    if not os.path.isfile(train_txt):
        sys.exit(f"no {train_txt}: pass --shared PATH, the folder that holds data/tinystories")
    os.makedirs(args.work, exist_ok=True)
    if args.tune:
        train_txt, valid_txt = split_stories(train_txt, args.work)
    data = os.path.join(args.work, "data")
    if not os.path.exists(os.path.join(data, "stories", "meta.json")):
        with contextlib.redirect_stdout(sys.stderr):
            if args.size == "15m":
                tokenizer = os.path.join(os.path.abspath(args.shared), "tokenizers", "llama2.model")
                tinystories.prepare(data, train_txt, "stories", tokenizer=tokenizer)
            else:
                tinystories.train_vocab(data, 512, input=train_txt, name="stories")
                tinystories.prepare(data, train_txt, "stories", vocab_size=512)
    return data, valid_txt


def train_and_measure(name: str, argv: list[str], data: str, valid_txt: str, args) -> dict:
    out = os.path.join(args.work, name)
    argv = [*argv, f"--data_dir={data}", f"--out_dir={out}"]
    print(f"$ python train.py {shlex.join(argv)}", flush=True)
    t0 = time.time()
    with open(out + ".log", "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        train.train(train.parse_settings(argv))
    seconds = time.time() - t0
    with contextlib.redirect_stdout(sys.stderr):
        result = evaluation.main([f"--checkpoint={os.path.join(out, 'ckpt.pt')}", f"--input={valid_txt}",
                                  "--format=text", "--device=cpu", "--batch_size=32"])
    print(f"{name}: {result['bits_per_byte']:.4f} bits per byte, {result['loss']:.4f} loss per token "
          f"({seconds:.0f} s)", flush=True)
    return {**result, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SHAPES), default="260k")
    p.add_argument("--budgets", default="1e6,2e6", help="training tokens of each run, comma-separated")
    p.add_argument("--recipes", default="old,new", help="which to run: old, new or both")
    p.add_argument("--old", default="", help="settings added to the old recipe: --old=--batch_size=8")
    p.add_argument("--new", default="", help="train.py settings added to the new recipe")
    p.add_argument("--label", default="", help="added to the runs' names in --work (to keep variants apart)")
    p.add_argument("--tune", action="store_true",
                   help="train on 9 training stories in 10 and measure on the 10th, not on sample-valid.txt")
    p.add_argument("--max_seq_len", type=int, default=256)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: half the cores)")
    p.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"),
                   help="the folder holding data/tinystories and tokenizers/llama2.model")
    p.add_argument("--work", default=None, help="data and runs go here (default: /tmp/bench_recipe_SIZE)")
    args = p.parse_args()
    args.work = os.path.abspath(args.work or f"/tmp/bench_recipe_{args.size}{'_tune' if args.tune else ''}")
    train.runtime.use_cpu_threads(args.threads)
    data, valid_txt = prepare(args)
    budgets = [int(float(b)) for b in args.budgets.split(",")]
    recipes = {"old": (OLD[args.size] + shlex.split(args.old), OLD_WARMUP),
               "new": (NEW[args.size] + shlex.split(args.new), NEW_WARMUP)}
    common = [*SHAPES[args.size], "--dataset=stories", f"--max_seq_len={args.max_seq_len}",
              "--gradient_accumulation_steps=1", "--device=cpu", "--dtype=float32", "--compile=False",
              f"--seed={args.seed}", "--eval_iters=20", "--log_interval=50", "--overwrite=True"]
    results = {}
    for budget in budgets:
        for recipe in args.recipes.split(","):
            argv, warmup = recipes[recipe]
            batch = int(train.parse_settings(argv)["batch_size"])
            iters = budget // (batch * args.max_seq_len)
            run = [*common, *argv, f"--max_iters={iters}", f"--eval_interval={iters}",
                   f"--warmup_iters={max(1, round(warmup * iters))}"]
            name = f"{recipe}{args.label}_{budget}"
            results[recipe, budget] = train_and_measure(name, run, data, valid_txt, args)

    held_out = "the tenth of the training stories (--tune)" if args.tune else "sample-valid.txt"
    print(f"\n{args.size} shapes, context {args.max_seq_len}, seed {args.seed}; "
          f"bits per byte on {held_out}:\n")
    print("| recipe | " + " | ".join(f"{b / 1e6:g}M tokens" for b in budgets) + " |")
    print("| --- |" + " --- |" * len(budgets))
    for recipe in args.recipes.split(","):
        figures = [f"{results[recipe, b]['bits_per_byte']:.3f}" for b in budgets]
        print(f"| {recipe} | " + " | ".join(figures) + " |")


if __name__ == "__main__":
    main()
