"""
Training speed of the reference configs: time per iteration, tokens/s and (on a GPU) MFU.

    python bench/bench_train.py                                   # CPU: short runs, small micro-batches
    python bench/bench_train.py --device cuda --compile --dtype bfloat16
    python bench/bench_train.py --configs 15m,110m --batch_size 8 --iters 5

Each config's model and optimizer are built exactly as train.py builds them (config file ->
parse_config -> ModelArgs, AdamW from configure_optimizers, autocast, GradScaler for float16,
gradient clipping, torch.compile when asked) and run on random tokens, so the figures measure
the step itself, not the data pipeline. One measured step is `accum` micro-batches of
`batch_size` sequences; on a GPU the defaults are the config's own (per-process) batch and
accumulation, so "ms/iter" is the real iteration time on one GPU. On a CPU the full configs take
minutes per iteration, so the default is a smaller micro-batch, and the time of a full
iteration is extrapolated from the measured tokens/s ("full iter").
"""
import argparse
import os
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import cpu_speedups  # noqa: E402
import settings  # noqa: E402  (after the path tweak: bench/ runs as a script)
import train  # noqa: E402
from configurator import parse_config  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

CONFIGS = ["260k", "15m", "42m", "110m"]
CPU_BATCH = {"260k": 32, "15m": 16, "42m": 2, "110m": 1}  # small enough for seconds per step on 2 cores


def bench_config(name: str, args) -> dict:
    path = os.path.join(os.path.dirname(train.__file__), "config", f"train_{name}.py")
    overrides = [f"--device={args.device}", f"--dtype={args.dtype}", f"--compile={args.compile}"]
    c = settings.resolve_config(parse_config(train.default_config(), [path] + overrides))
    device, device_type = c["device"], c["device"].split(":")[0]
    on_gpu = device_type == "cuda"
    batch = args.batch_size or (c["batch_size"] if on_gpu else CPU_BATCH[name])
    accum = args.accum or (c["gradient_accumulation_steps"] // args.world_size if on_gpu else 1)
    T = c["max_seq_len"]

    torch.manual_seed(0)
    if on_gpu:
        torch.set_float32_matmul_precision("high")
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[c["dtype"]]
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    raw_model = Transformer(ModelArgs.from_dict(c)).to(device)
    optimizer = raw_model.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]),
                                               device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=c["dtype"] == "float16")
    if c["compile"]:
        # a fresh dynamo for each config, and static shapes: each figure is one config's own graph, as in a
        # user's run (otherwise the 2nd-4th configs recompile with dynamic shapes)
        torch._dynamo.reset()
    model = torch.compile(raw_model, dynamic=False) if c["compile"] else raw_model
    x = torch.randint(c["vocab_size"], (batch, T), device=device)
    y = torch.randint(c["vocab_size"], (batch, T), device=device)

    def step():
        for _ in range(accum):
            with ctx:
                _, loss = model(x, y)
                loss = loss / accum
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), c["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):  # compilation and allocator warm-up
        step().item()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        loss = step()
    loss.item()  # waits for the GPU
    if on_gpu:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.iters
    tokens = batch * T * accum
    peak = settings.resolve_peak_flops(args.peak_flops, device_type)
    full_tokens = c["gradient_accumulation_steps"] * c["batch_size"] * T  # one iteration of the real recipe
    return {
        "config": name, "params": raw_model.num_params(), "step": f"{batch}x{T}x{accum}", "ms_iter": dt * 1000,
        "tok_s": tokens / dt, "mfu": raw_model.estimate_mfu(tokens, dt, peak) if peak else None,
        "full_iter_s": full_tokens / args.world_size / (tokens / dt),
        "mem_gb": torch.cuda.max_memory_allocated() / 1e9 if on_gpu else None,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ",".join(CONFIGS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batch_size", type=int, default=0, help="micro-batch (default: see above)")
    parser.add_argument("--accum", type=int, default=0, help="micro-batches per measured step")
    parser.add_argument("--world_size", type=int, default=1,
                        help="GPUs the recipe would run on (splits its accumulation; default 1)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first: compilation, and on a CPU the heap settling (cpu_speedups.keep_freed_memory)")
    parser.add_argument("--peak_flops", default=None, help="FLOP/s or GPU name for MFU (default: from the GPU)")
    args = parser.parse_args(argv)
    if args.peak_flops is not None:
        try:
            args.peak_flops = float(args.peak_flops)
        except ValueError:
            pass  # a GPU name
    return args


def main():
    args = parse_args()
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        cpu_speedups.keep_freed_memory()  # as train.py's main() does: the whole process, so here
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"error: unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")

    device = settings.resolve_config(train.default_config() | {"device": args.device})["device"]
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores, " \
        f"{torch.get_num_threads()} threads)"
    print(f"# bench_train: {where}, torch {torch.__version__}, dtype {args.dtype}, compile {args.compile}, "
          f"{args.iters} timed step(s) after {args.warmup} warm-up")
    print("| config | params | measured step (B x T x accum) | ms/iter | tokens/s | MFU | full iter (s) | peak mem |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        try:
            r = bench_config(name, args)
        except torch.cuda.OutOfMemoryError:
            print(f"| {name} | | out of memory: lower --batch_size | | | | | |", flush=True)
            torch.cuda.empty_cache()
            continue
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['mem_gb']:.1f} GB" if r["mem_gb"] is not None else "-"
        print(f"| {r['config']} | {r['params'] / 1e6:.2f}M | {r['step']} | {r['ms_iter']:.1f} | {r['tok_s']:,.0f} | "
              f"{mfu} | {r['full_iter_s']:.2f} | {mem} |", flush=True)


if __name__ == "__main__":
    main()
