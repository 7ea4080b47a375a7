"""
The CPU speed-ups of llamatiny/cpu_kernels.py that no other benchmark isolates, each timed in one run against
the plain computation it replaces, with every other setting the same (float32, --threads threads):

    small-head attention  small_head_causal_attention against PyTorch's scaled_dot_product_attention,
                          forward and backward, at the 260K training shapes (32 x 512, 8 heads of 8), and
                          at the 15M ones (16 x 256, 6 heads of 48) where model.py does not use it
    dropout attention     causal_attention with dropout (queries in blocks) against PyTorch's
                          scaled_dot_product_attention with the same dropout, at both shapes
    decode classifier     a batch-1 decode step's classifier: the hidden state against the packed
                          (dim, vocab) transpose, against F.linear on the model's (vocab, dim) weight
    kept freed memory     bench_train.py's 15M step (16 x 256) in a process that called
                          keep_freed_memory() against one that did not; the two kinds of process
                          alternate, and each reports its mean step

    python bench/bench_speedups.py                 # --threads 1 --repeats 20 --memory_rounds 3
    python bench/bench_speedups.py --threads 2 --skip_memory   # the in-process rows only (minutes)

The packed decode step as a whole, and the small-head attention inside a whole training step, are in
bench_sample.py and bench_train.py, against llama2.c itself.
"""
import argparse
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402
from bench_choices import side_by_side  # noqa: E402

from llamatiny import cpu_kernels  # noqa: E402

SHAPES = {"260K shapes (32 x 512, 8 heads of 8)": (32, 8, 4, 512, 8),  # B, heads, kv heads, T, head_dim
          "15M shapes (16 x 256, 6 heads of 48)": (16, 6, 6, 256, 48)}


def attention_pair(ours, dropout: float, B: int, H: int, KV: int, T: int, hd: int):
    # forward + backward: (ours, PyTorch's SDPA with the same dropout) on the same tensors
    q = torch.randn(B, H, T, hd, requires_grad=True)
    k, v = (torch.randn(B, KV, T, hd, requires_grad=True) for _ in range(2))
    dy = torch.randn(B, H, T, hd)

    def plain():
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=True)
        y.backward(dy)

    return lambda: ours(q, k, v).backward(dy), plain


def blocks_with_dropout(q, k, v):
    return cpu_kernels.causal_attention_in_blocks(q, k, v, 0.05)


def attention(repeats: int) -> None:
    for name, shape in SHAPES.items():
        side_by_side(f"attention, forward + backward, {name}: small-head kernel / SDPA",
                     *attention_pair(cpu_kernels.small_head_causal_attention, 0.0, *shape), repeats)
    for name, shape in SHAPES.items():
        side_by_side(f"attention, dropout 0.05, forward + backward, {name}: blocks / SDPA",
                     *attention_pair(blocks_with_dropout, 0.05, *shape), repeats)


def decode_classifier(repeats: int) -> None:
    weight = torch.randn(32000, 288) * 0.02  # the 15M model's (vocab, dim) classifier
    packed = weight.t().contiguous()  # (dim, vocab), as Decoder packs it
    h = torch.randn(1, 288)
    side_by_side("decode classifier, batch 1, 15M: packed transpose / F.linear",
                 lambda: h @ packed, lambda: F.linear(h, weight), repeats * 20)


def kept_memory(args) -> None:
    ms = {"kept": [], "returned": []}
    for _ in range(args.memory_rounds):  # alternating processes, so that load from elsewhere hits both alike
        for kind in ms:
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--threads", str(args.threads),
                                  "--steps", str(args.steps), "--warmup", str(args.warmup)],
                                 capture_output=True, text=True, check=True)
            ms[kind].append(float(out.stdout.split()[-1]))
    ratios = [r / k for k, r in zip(ms["kept"], ms["returned"], strict=True)]
    kept, returned = (statistics.median(ms[k]) for k in ("kept", "returned"))
    print(f"| 15M training step, 16 x 256: freed memory kept / returned (medians of {args.memory_rounds} "
          f"processes each, {args.steps} steps after {args.warmup}) | {kept:.0f} ms | {returned:.0f} ms | "
          f"{statistics.median(ratios):.2f}x ({min(ratios):.2f} - {max(ratios):.2f}) |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20, help="timed calls of each in-process pair")
    p.add_argument("--memory_rounds", type=int, default=3, help="process pairs for the kept-memory row")
    p.add_argument("--steps", type=int, default=4, help="timed steps per kept-memory process")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first in each process")
    p.add_argument("--skip_memory", action="store_true", help="skip the kept-memory row (minutes)")
    p.add_argument("--child", choices=("kept", "returned"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if min(args.threads, args.repeats, args.memory_rounds, args.steps) < 1 or args.warmup < 0:
        p.error("--threads, --repeats, --memory_rounds and --steps must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    if args.child:  # one process of the kept-memory row: print its ms per step
        if args.child == "kept" and not cpu_kernels.keep_freed_memory():
            sys.exit("error: keep_freed_memory needs glibc (Linux)")
        step = bench_train.parse_args(["--device=cpu", f"--iters={args.steps}", f"--warmup={args.warmup}"])
        print(bench_train.bench_config("15m", step)["ms_iter"])
        return
    torch.manual_seed(0)
    print(f"{bench_train.machine()}, float32, {args.threads} thread(s), medians of {args.repeats} "
          "(alternating)\n")
    print("| speed-up | ours | plain | ours faster by |")
    print("| --- | --- | --- | --- |")
    attention(args.repeats)
    decode_classifier(args.repeats)
    if not args.skip_memory:
        kept_memory(args)


if __name__ == "__main__":
    main()
