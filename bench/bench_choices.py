"""
The small choices in model.py that are there for speed, each timed against the plain alternative in one
run, alternating, on the CPU (float32):

    fused AdamW       configure_optimizers' fused=True against torch's default per-parameter loop, one
                      optimizer step over the 15M model's parameters
    top-p candidates  top-p over the 1024 likeliest tokens (torch.topk) against sorting the whole
                      32,000-token vocabulary, batch 1, on a trained-like (peaked) distribution
    inverse-CDF draw  model.sample_next's searchsorted draw against torch.multinomial on the same
                      filtered distribution

    python bench/bench_choices.py                # --threads 1 (default) --repeats 200
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from model import ModelArgs, Transformer, _candidates  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def side_by_side(name: str, ours, plain, repeats: int) -> None:
    for _ in range(3):  # warm up both
        ours(), plain()
    a, b = [], []
    for _ in range(5):  # alternate in blocks, so that a machine busy elsewhere slows both alike
        a += timed(ours, repeats // 5)
        b += timed(plain, repeats // 5)
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"| {name} | {ma * 1e3:.3f} ms | {mb * 1e3:.3f} ms | {mb / ma:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), medians of {args.repeats}\n")
    print("| choice | ours | plain alternative | ours faster by |")
    print("| --- | --- | --- | --- |")

    model = Transformer(ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=32000, multiple_of=32))
    for p_ in model.parameters():
        p_.grad = torch.randn_like(p_) * 1e-3
    params = [p_ for p_ in model.parameters()]
    fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    loop = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    side_by_side("AdamW step, 15M parameters: fused / per-parameter loop", fused.step, loop.step,
                 max(args.repeats // 10, 10))

    logits = torch.randn(1, 32000) * 4  # peaked: most of the mass on a few hundred tokens
    top_p = 0.9

    def full_sort():
        probs, index = logits.softmax(-1).sort(-1, descending=True)
        cumulative = probs.cumsum(-1)
        return probs.masked_fill(cumulative - probs >= top_p, 0.0), index

    side_by_side("top-p 0.9 candidates: topk(1024) / sort 32,000", lambda: _candidates(logits, None, top_p),
                 full_sort, args.repeats)

    values, index = _candidates(logits, None, top_p)

    def inverse_cdf():
        cdf = values.softmax(-1).cumsum(-1)
        u = (1.0 - torch.rand(1, 1)) * cdf[:, -1:]
        return index.gather(-1, torch.searchsorted(cdf, u))

    side_by_side("one draw: inverse CDF / torch.multinomial", inverse_cdf,
                 lambda: index.gather(-1, torch.multinomial(values.softmax(-1), 1)), args.repeats)


if __name__ == "__main__":
    main()
