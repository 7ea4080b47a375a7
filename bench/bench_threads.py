"""
Why train.py, sample.py and eval.py take every core of an idle machine and half of a busy one: training
steps, or decoded tokens, at each thread count, timed side by side (alternating), beside --neighbours busy
processes (a laptop's browser, another job) or none.

    python bench/bench_threads.py                  # 260K shape, 8 x 512; threads 1 and all cores
    python bench/bench_threads.py --threads 1,2,4 --neighbours 0
    python bench/bench_threads.py --decode --neighbours 0        # sample.py's decoding, 15M shape

Each step is forward + backward + AdamW of the model, float32, CPU speed-ups on (as train.py); with
--decode, 100 greedy tokens of the 15M-shaped model (random weights) after a 5-token prompt, on the
weights packed as sample.py packs them. The neighbour is a Python process spinning on one core
(--neighbours N of them). OpenMP threads wait for each other at the end of every parallel region, so one
thread descheduled by the neighbour stalls the others.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from bench_train import machine  # noqa: E402

from llamatiny import cpu_kernels  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated thread counts")
    p.add_argument("--neighbours", type=int, default=1, help="busy processes started beside the benchmark")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="alternations; 3 steps per thread count per round")
    p.add_argument("--decode", action="store_true", help="time sample.py's decoding instead of training")
    args = p.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    step, tokens, what = decode_step() if args.decode else train_step(args.batch_size)
    spin = [sys.executable, "-c", "while True: pass"]
    neighbours = [subprocess.Popen(spin) for _ in range(args.neighbours)]
    try:
        times = {n: [] for n in counts}
        for _ in range(args.rounds):
            for n in counts:
                torch.set_num_threads(n)
                step()  # the first step after a change of thread count starts the new threads
                for _ in range(3):
                    t0 = time.perf_counter()
                    step()
                    times[n].append(time.perf_counter() - t0)
    finally:
        for proc in neighbours:
            proc.kill()
    print(f"{what}, {args.neighbours} busy neighbour(s); {args.rounds * 3} steps per thread count; "
          f"{machine()}\n")
    print("| threads | median tokens/s | slowest step's tokens/s | fastest step's tokens/s |")
    print("| --- | --- | --- | --- |")
    for n in counts:
        median, slowest, fastest = statistics.median(times[n]), max(times[n]), min(times[n])
        print(f"| {n} | {tokens / median:,.0f} | {tokens / slowest:,.0f} | {tokens / fastest:,.0f} |")


def train_step(batch_size: int):
    torch.manual_seed(0)
    args_260k = ModelArgs(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4,
                          max_seq_len=512)
    model = cpu_kernels.attach(Transformer(args_260k))  # as train.py runs on a CPU
    optimizer = model.configure_optimizers(0.01, 1e-3, (0.9, 0.99), "cpu")
    x = torch.randint(0, 512, (batch_size, 513))

    def step():
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, batch_size * 512, f"training, 260K shape, {batch_size} x 512 tokens"


def decode_step(new_tokens: int = 100):
    torch.manual_seed(0)
    model = cpu_kernels.attach(Transformer(ModelArgs()).eval(), frozen=True)  # as sample.py loads it
    prompt = torch.randint(0, 32000, (1, 5))

    def step():
        for _ in model.generate_stream(prompt, new_tokens, temperature=0.0):
            pass

    return step, new_tokens, f"greedy decoding, 15M shape, {new_tokens} tokens after a 5-token prompt"


if __name__ == "__main__":
    main()
