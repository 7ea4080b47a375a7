"""
The CPU speed-ups of cpu_speedups.py that no other benchmark isolates, each timed in one run against
the plain computation it replaces, with every other setting the same (float32, one thread):

    dropout attention   causal_attention with dropout (queries in blocks) against PyTorch's
                        scaled_dot_product_attention with the same dropout, forward and backward, at the
                        260K training shapes (32 x 512, 8 heads of 8) and the 15M ones (16 x 256, 6 of 48)
    decode classifier   a batch-1 decode step's classifier: the hidden state against the packed
                        (dim, vocab) transpose, against F.linear on the model's (vocab, dim) weight
    kept freed memory   15M training steps (16 x 256, forward, backward, clipping, fused AdamW) in a
                        process that called keep_freed_memory() against one that did not; the two
                        kinds of process alternate, and each reports its median step

    python bench/bench_speedups.py                 # --repeats 20 --memory_rounds 3
    python bench/bench_speedups.py --skip_memory   # the in-process rows only (a minute)

The packed decode step as a whole, and the small-head attention, are in bench_sample.py and
bench_train.py, against llama2.c itself.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_choices import side_by_side  # noqa: E402
from bench_train import machine  # noqa: E402

import cpu_speedups  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

MODEL_15M = ModelArgs(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, max_seq_len=256)


def attention_pair(B: int, H: int, KV: int, T: int, hd: int):
    # forward + backward with dropout 0.05: (ours in query blocks, PyTorch's SDPA) on the same tensors
    q = torch.randn(B, H, T, hd, requires_grad=True)
    k, v = (torch.randn(B, KV, T, hd, requires_grad=True) for _ in range(2))
    dy = torch.randn(B, H, T, hd)

    def blocked():
        cpu_speedups.causal_attention_in_blocks(q, k, v, 0.05).backward(dy)

    def plain():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.05, enable_gqa=True).backward(dy)

    return blocked, plain


def dropout_attention(repeats: int) -> None:
    for name, shape in {"260K shapes (32 x 512, 8 heads of 8)": (32, 8, 4, 512, 8),
                        "15M shapes (16 x 256, 6 heads of 48)": (16, 6, 6, 256, 48)}.items():
        side_by_side(f"attention, dropout 0.05, forward + backward, {name}: blocks / SDPA",
                     *attention_pair(*shape), repeats)


def decode_classifier(repeats: int) -> None:
    weight = torch.randn(32000, 288) * 0.02  # the 15M model's (vocab, dim) classifier
    packed = weight.t().contiguous()  # (dim, vocab), as Decoder packs it
    h = torch.randn(1, 288)
    side_by_side("decode classifier, batch 1, 15M: packed transpose / F.linear",
                 lambda: h @ packed, lambda: F.linear(h, weight), repeats * 20)


def training_steps(keep: bool, steps: int, warmup: int) -> float:
    # the median seconds per 15M step in this process; keep: keep_freed_memory() first, as train.py does
    if keep:
        assert cpu_speedups.keep_freed_memory(), "keep_freed_memory needs glibc (Linux)"
    torch.manual_seed(0)
    model = Transformer(MODEL_15M)
    optimizer = model.configure_optimizers(0.1, 5e-4, (0.9, 0.95), "cpu")
    tokens = torch.randint(0, MODEL_15M.vocab_size, (16, MODEL_15M.max_seq_len + 1))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kept_memory(rounds: int, steps: int, warmup: int) -> None:
    medians = {"kept": [], "returned": []}
    for _ in range(rounds):  # alternating processes, so that load from elsewhere hits both alike
        for kind in medians:
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--steps", str(steps),
                                  "--warmup", str(warmup)], capture_output=True, text=True, check=True)
            medians[kind].append(float(out.stdout.split()[-1]))
    ratios = [r / k for k, r in zip(medians["kept"], medians["returned"], strict=True)]
    kept, returned = (statistics.median(medians[k]) for k in ("kept", "returned"))
    print(f"| 15M training step, 16 x 256: freed memory kept / returned (medians of {rounds} processes each, "
          f"{steps} steps after {warmup}) | {kept * 1e3:.0f} ms | {returned * 1e3:.0f} ms | "
          f"{statistics.median(ratios):.2f}x ({min(ratios):.2f} - {max(ratios):.2f}) |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20, help="timed calls of each in-process pair")
    p.add_argument("--memory_rounds", type=int, default=3, help="process pairs for the kept-memory row")
    p.add_argument("--steps", type=int, default=4, help="timed steps per kept-memory process")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first in each process")
    p.add_argument("--skip_memory", action="store_true", help="skip the kept-memory row (minutes)")
    p.add_argument("--child", choices=("kept", "returned"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.child:  # one process of the kept-memory row: print its median step
        print(training_steps(args.child == "kept", args.steps, args.warmup))
        return
    torch.manual_seed(0)
    print(f"{machine()}, float32, one thread, medians of {args.repeats} (alternating)\n")
    print("| speed-up | ours | plain | ours faster by |")
    print("| --- | --- | --- | --- |")
    dropout_attention(args.repeats)
    decode_classifier(args.repeats)
    if not args.skip_memory:
        kept_memory(args.memory_rounds, args.steps, args.warmup)


if __name__ == "__main__":
    main()
