"""
LoRA against a full fine-tune of the 15M model (config/train_15m.py's shape), side by side: trainable
parameters, optimizer-state bytes, checkpoint size, peak memory and the time of a training step.

    python bench/bench_lora.py                                # CPU, float32, rank 8 on every matrix, 16 x 256
    python bench/bench_lora.py --rank 16 --targets wq,wv --steps 10
    python bench/bench_lora.py --device cuda --dtype bfloat16 --batch_size 128

Both fine-tune the same weights (random: the figures depend on the shape, not the values) on the same
random tokens, built the way train.py builds them: the model, lora.attach for LoRA, configure_optimizers
(AdamW with weight decay), autocast, gradient clipping. Each runs in fresh processes of its own. On a GPU
the peak memory is torch's peak allocation. On a CPU it is the process's peak resident set (interpreter
and torch included) in a run of its own, two steps with glibc told to hand every block of 64 KiB or more
back at once (MALLOC_MMAP_THRESHOLD_), so that the peak is the memory in use, not what the allocator
kept; the steps are timed as train.py runs them, freed memory kept (cpu_speedups.keep_freed_memory).
The checkpoint is what train.py saves, its model entries (lora.checkpoint_entries: the whole state_dict,
or the adapters) and the optimizer, measured on disk.
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

import cpu_speedups  # noqa: E402
import lora  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

SHAPE = dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, multiple_of=32, max_seq_len=256)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(mode: str, args) -> dict:
    """One fine-tune ('full' or 'lora') in this process; main() runs each in child processes."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu" and not args.memory:
        cpu_speedups.keep_freed_memory()  # as train.py sets up a CPU run
    torch.manual_seed(1337)
    model = Transformer(ModelArgs(**SHAPE)).to(device)
    base = None
    if mode == "lora":
        model = lora.attach(model, args.rank, args.alpha, targets=args.targets)
        base = {"path": "random weights", "sha256": "0" * 64}  # a real run records its --init_from file
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    x = torch.randint(0, SHAPE["vocab_size"], (args.batch_size, SHAPE["max_seq_len"]), device=device)
    y = torch.randint(0, SHAPE["vocab_size"], (args.batch_size, SHAPE["max_seq_len"]), device=device)

    def step() -> float:
        sync(device)
        t0 = time.perf_counter()
        with ctx:
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t0

    for _ in range(args.warmup):  # the allocator settles; the optimizer state comes into being
        step()
    times = [step() for _ in range(args.steps)]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" \
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB; before saving
    optimizer_bytes = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.pt")
        torch.save({**lora.checkpoint_entries(model, base), "model_args": asdict(model.args),
                    "optimizer": optimizer.state_dict()}, path)
        checkpoint_bytes = os.path.getsize(path)
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "params": sum(p.numel() for n, p in model.named_parameters()
                          if not n.endswith(lora.ADAPTER_KEYS)),
            "optimizer_bytes": optimizer_bytes, "checkpoint_bytes": checkpoint_bytes, "peak_bytes": peak,
            "step_s": statistics.median(times), "best_s": min(times)}


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
    p.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)  # a child process's job
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)  # a CPU memory child's
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode:
        print(json.dumps(measure(args.mode, args)))
        return

    def child(mode: str, memory: bool) -> dict:
        settings = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("mode", "memory")]
        extra = ["--memory", "--warmup=1", "--steps=1"] if memory else []
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if memory else None
        out = subprocess.run([sys.executable, __file__, "--mode", mode, *settings, *extra], env=env,
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"error: the {mode} fine-tune failed:\n{out.stderr}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    results = {}
    for mode in ("full", "lora"):
        results[mode] = child(mode, memory=False)
        if args.device == "cpu":
            results[mode]["peak_bytes"] = child(mode, memory=True)["peak_bytes"]
    full, low = results["full"], results["lora"]
    tokens = args.batch_size * SHAPE["max_seq_len"]
    print(f"# bench_lora: the 15M shape ({full['params']:,} parameters), {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size} x {SHAPE['max_seq_len']} = {tokens:,} "
          f"tokens/step; LoRA rank {args.rank}, alpha {args.alpha:g} on {args.targets}; "
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
