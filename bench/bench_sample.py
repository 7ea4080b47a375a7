"""
Generation speed of model.py for a 15M-shaped model (dim 288, 6 layers, 6 heads, vocab 32000,
max_seq_len 256, random weights): 256 new tokens after BOS, batch 1, in tokens/s.

Side by side in one process, runs alternating so that load from other processes hits all alike:
  uncached   llama2.c's Python sample.py approach: a full forward over the whole sequence for every
             new token (our model called without the cache, nor the classifier copy; the same sampler)
  cached     model.generate: prefill, then one token at a time through the KV cache, with the
             classifier against a contiguous (dim, vocab) copy of its weight (MKL's h @ W.T is ~3x
             slower on this CPU) and the sampler that sorts only the head of the distribution and
             draws by inverse CDF (see cpu_speedups.transposed_classifier and model.sample_next)
each greedy (temperature 0) and sampled the way run.c samples by default (temperature 1, top_p 0.9).
A random model's next-token distribution is nearly uniform (10 nats; top_p 0.9 keeps ~26,000
tokens), unlike a trained one's, so the final norm's weight is set to --norm_scale 7.5, which brings
it to ~1 nat per token (a trained 15M model's validation loss is ~1.07) and a nucleus of ~100 tokens.
The greedy tokens of all variants are checked to agree (the first 255: at the 256th the cache slides its
window while the uncached loop crops its input). References on this project's 2-core CPU (the
issue's): llama2.c's sample.py about 34 tokens/s, llama2.c's run.c (make runfast, one thread) about
130 tokens/s.

Measured there (one thread, median of 5, three runs, the machine shared): uncached 28 tokens/s; cached
greedy 131-143 (1.0-1.1x run.c), sampled 112-128 (0.86-0.99x); --compile'd greedy 163, sampled 138.
Before the classifier copy and the new sampler: cached greedy 100-116, sampled 66-76.

    python bench/bench_sample.py                      # CPU, float32, one thread (as run.c's reference)
    python bench/bench_sample.py --threads 2 --repeats 5
    python bench/bench_sample.py --compile            # adds torch.compile'd cached decoding
    python bench/bench_sample.py --device cuda --dtype bfloat16 --compile
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # model.py lives at the repo root
import model as model_py  # noqa: E402

REFERENCE_TOK_S = {"llama2.c sample.py (no cache)": 34.0, "llama2.c run.c, one thread": 130.0}
SAMPLING = {"greedy": dict(temperature=0.0), "T=1 top_p=0.9": dict(temperature=1.0, top_p=0.9)}


@torch.inference_mode()
def generate_uncached(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None):
    # llama2.c's sample.py: re-run the whole (cropped) sequence for each new token
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.args.max_seq_len:])  # (B, 1, vocab): last position only
        next_token = model_py.sample_next(logits[:, -1, :], temperature, top_k, top_p)
        idx = torch.cat((idx, next_token[:, None]), dim=1)
    return idx


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd cached decoding")
    parser.add_argument("--skip_uncached", action="store_true")
    parser.add_argument("--norm_scale", type=float, default=7.5, help="final norm weight (1 = random init)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    ours = model_py.Transformer(model_py.ModelArgs()).eval()  # the 15M shape
    with torch.no_grad():
        ours.norm.weight.fill_(args.norm_scale)  # a trained model's peakedness, see above
    ours = ours.to(args.device, dtype)
    idx = torch.tensor([[1]], device=args.device)  # BOS
    n = args.new_tokens
    where = f"{args.device} {args.dtype}" + (f", {torch.get_num_threads()} thread(s)" if args.device == "cpu" else "")
    print(f"15M-shaped model ({ours.num_params() / 1e6:.2f}M params), {n} new tokens, batch 1, {where}")

    def run_ours(m, sampling):
        return m.generate(idx, n, **sampling)

    variants = {} if args.skip_uncached else {"uncached (llama2.c sample.py style)":
                                              (ours, lambda m, s: generate_uncached(m, idx, n, **s))}
    variants["cached: model.generate"] = (ours, run_ours)
    if args.compile:
        compiled = copy.deepcopy(ours)
        # generate_stream runs self.hidden_states for the prefill and each decode step, as sample.py compiles it
        compiled.hidden_states = torch.compile(compiled.hidden_states, dynamic=True)
        t0 = time.perf_counter()
        run_ours(compiled, SAMPLING["greedy"])  # compiles prefill and decode
        sync(args.device)
        print(f"torch.compile warm-up: {time.perf_counter() - t0:.1f} s")
        variants["cached, torch.compile'd forward"] = (compiled, run_ours)

    results = {}
    for label, sampling in SAMPLING.items():
        for m, fn in variants.values():  # warm-up (allocations, kernels) outside the timing
            fn(m, {**sampling})
        times = {name: [] for name in variants}
        outputs = {}
        for _ in range(args.repeats):
            for name, (m, fn) in variants.items():
                torch.manual_seed(1)
                sync(args.device)
                t0 = time.perf_counter()
                outputs[name] = fn(m, sampling)
                sync(args.device)
                times[name].append(time.perf_counter() - t0)
        if label == "greedy":
            tokens = {name: out[0, 1:n].tolist() for name, out in outputs.items()}
            first = next(iter(tokens.values()))
            agree = all(t == first for t in tokens.values())
            print(f"greedy tokens agree across variants (first {n - 1}): {agree}")
        results[label] = {name: (n / statistics.median(t), n / min(t)) for name, t in times.items()}

    width = max(map(len, variants)) + 2
    print(f"\n{'tokens/s (median / best)':<{width}}" + "".join(f"{label:>24}" for label in SAMPLING))
    for name in variants:
        print(f"{name:<{width}}" + "".join(f"{results[label][name][0]:>15.1f} / {results[label][name][1]:<6.1f}"
                                           for label in SAMPLING))
    base = "uncached (llama2.c sample.py style)"
    for label in SAMPLING:
        cached = results[label]["cached: model.generate"][0]
        line = f"{label}: cached / uncached = {cached / results[label][base][0]:.1f}x; " if base in results[label] else ""
        print(line + "; ".join(f"{k} {cached / v:.2f}x" for k, v in REFERENCE_TOK_S.items()))
    print("references: " + ", ".join(f"{k} ~{v:.0f} tok/s" for k, v in REFERENCE_TOK_S.items())
          + " (the issue's figures for this project's 2-core CPU)")


if __name__ == "__main__":
    main()
