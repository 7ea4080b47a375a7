"""
LoRA against a full fine-tune of the 15M model (config/train_15m.py's shape), side by side: trainable
parameters, optimizer-state bytes, checkpoint size, peak memory and the time of a training step.

    python bench/bench_lora.py                                # CPU, float32, rank 8 on every matrix, 16 x 256
    python bench/bench_lora.py --rank 16 --targets wq,wv --steps 10
    python bench/bench_lora.py --device cuda --dtype bfloat16 --batch_size 128

Both fine-tune the same weights (random: the figures depend on the shape, not the values) on the same
random tokens, built the way train.py builds them: the model, lora.attach for LoRA, configure_optimizers
(AdamW with weight decay), autocast, gradient clipping. The two are timed in one process, their steps
alternating, so that a machine busy with other work slows both alike (on a CPU with freed memory kept,
cpu_kernels.keep_freed_memory, as train.py runs). Peak memory is measured in a process per fine-tune,
two steps: on a GPU torch's peak allocation; on a CPU the peak resident set (interpreter and torch
included) with glibc told to hand back every block of 64 KiB or more at once (MALLOC_MMAP_THRESHOLD_),
so that it is the memory in use, not what the allocator kept. The checkpoint is what train.py saves of
the model (lora.checkpoint_entries: the whole state_dict, or the adapters) and the optimizer, on disk.
"""
import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from llamatiny import cpu_kernels, lora  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

SHAPE = dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, multiple_of=32, max_seq_len=256)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class FineTune:
    """One fine-tune of the 15M shape, 'full' or 'lora', built the way train.py builds it."""

    def __init__(self, mode: str, args):
        self.device, dtype = torch.device(args.device), getattr(torch, args.dtype)
        torch.manual_seed(1337)  # the same weights and batch for both
        self.model = Transformer(ModelArgs(**SHAPE)).to(self.device)
        if self.device.type == "cpu":
            cpu_kernels.attach(self.model)
        self.base = None
        if mode == "lora":
            lora.attach(self.model, args.rank, args.alpha, targets=args.targets)
            self.base = {"path": "random weights", "sha256": "0" * 64}  # a run records its --init_from file
        self.optimizer = self.model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)
        self.ctx = torch.autocast(self.device.type, dtype=dtype) if dtype != torch.float32 \
            else contextlib.nullcontext()
        shape = (args.batch_size, SHAPE["max_seq_len"])
        self.x = torch.randint(0, SHAPE["vocab_size"], shape, device=self.device)
        self.y = torch.randint(0, SHAPE["vocab_size"], shape, device=self.device)

    def step(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        with self.ctx:
            _, loss = self.model(self.x, self.y)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - t0

    def sizes(self) -> dict:
        # (after a step, when the optimizer state exists)
        optimizer_bytes = sum(t.numel() * t.element_size() for state in self.optimizer.state.values()
                              for t in state.values() if torch.is_tensor(t))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ckpt.pt")
            entries = lora.checkpoint_entries(self.model, self.base)  # what train.py saves of the model
            torch.save({**entries, "model_args": asdict(self.model.args),
                        "optimizer": self.optimizer.state_dict()}, path)
            checkpoint_bytes = os.path.getsize(path)
        return {"trainable": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                "params": sum(p.numel() for n, p in self.model.named_parameters()
                              if not n.endswith(lora.ADAPTER_KEYS)),
                "optimizer_bytes": optimizer_bytes, "checkpoint_bytes": checkpoint_bytes}


def peak_memory(mode: str, args) -> int:
    # two steps of one fine-tune in a process of its own: the optimizer state exists in the second
    run = FineTune(mode, args)
    run.step()
    run.step()
    if run.device.type == "cuda":
        return torch.cuda.max_memory_allocated(run.device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def timings(args) -> dict:
    # both fine-tunes in this process, their steps alternating, so that a busy machine slows both alike
    if args.device == "cpu":
        cpu_kernels.keep_freed_memory()  # as train.py sets up a CPU run
    runs = {mode: FineTune(mode, args) for mode in ("full", "lora")}
    for _ in range(args.warmup):  # the allocator settles; the optimizer state comes into being
        for run in runs.values():
            run.step()
    times = {mode: [] for mode in runs}
    for _ in range(args.steps):
        for mode, run in runs.items():
            times[mode].append(run.step())
    return {mode: {**run.sizes(), "step_s": statistics.median(times[mode]), "best_s": min(times[mode])}
            for mode, run in runs.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default=",".join(lora.TARGETS), help="the matrices that get adapters")
    p.add_argument("--batch_size", type=int, default=16, help="sequences of 256 tokens per step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="autocast dtype; float32 runs without autocast")
    p.add_argument("--steps", type=int, default=5, help="timed steps per fine-tune")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--memory", choices=["full", "lora"], help=argparse.SUPPRESS)  # a child process's job
    p.add_argument("--timings", action="store_true", help=argparse.SUPPRESS)  # a child process's job
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory or args.timings:
        print(json.dumps(peak_memory(args.memory, args) if args.memory else timings(args)))
        return

    def child(*job: str, env=None):
        settings = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("memory", "timings")]
        out = subprocess.run([sys.executable, __file__, *settings, *job], env=env, capture_output=True,
                             text=True)
        if out.returncode:
            raise SystemExit(f"error: {' '.join(job)} failed:\n{out.stderr}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    results = child("--timings")
    hand_back = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # glibc frees every block >= 64 KiB at once
    for mode in results:
        results[mode]["peak_bytes"] = child(f"--memory={mode}", env=hand_back)
    full, low = results["full"], results["lora"]
    tokens = args.batch_size * SHAPE["max_seq_len"]
    print(f"# bench_lora: the 15M shape ({full['params']:,} parameters), {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} thread(s), batch {args.batch_size} x {SHAPE['max_seq_len']} = "
          f"{tokens:,} tokens/step; LoRA rank {args.rank}, alpha {args.alpha:g} on {args.targets}; "
          f"torch {torch.__version__}")
    rows = [("trainable parameters", "trainable", lambda v: f"{v:,}"),
            ("optimizer state", "optimizer_bytes", lambda v: f"{v / 1e6:.1f} MB"),
            ("checkpoint", "checkpoint_bytes", lambda v: f"{v / 1e6:.1f} MB"),
            ("peak memory", "peak_bytes", lambda v: f"{v / 1e6:.0f} MB"),
            (f"step (median of {args.steps})", "step_s", lambda v: f"{v * 1e3:.0f} ms"),
            ("step (best)", "best_s", lambda v: f"{v * 1e3:.0f} ms")]
    print("| | full fine-tune | LoRA | LoRA / full |")
    print("|---|---|---|---|")
    for name, key, show in rows:
        print(f"| {name} | {show(full[key])} | {show(low[key])} | {100 * low[key] / full[key]:.1f}% |")


if __name__ == "__main__":
    main()
