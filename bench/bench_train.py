"""
Training speed of the reference configs: time per iteration, tokens/s and (on a GPU) MFU.

    python bench/bench_train.py                                   # CPU: short runs, small micro-batches
    python bench/bench_train.py --device cuda --compile --dtype bfloat16
    python bench/bench_train.py --configs 15m,110m --batch_size 8 --iters 5
    python bench/bench_train.py --configs 15m --dim=32 --n_layers=1     # train.py settings after the config's

Each config's model and optimizer are built exactly as train.py builds them (config file ->
parse_config -> ModelArgs, AdamW from configure_optimizers, autocast, GradScaler for float16,
gradient clipping, torch.compile when asked) and run on random tokens, so the figures measure
the step itself, not the data pipeline. A config that fails (out of memory, a compile error, anything)
is a row saying why, and the next config runs. One measured step is `accum` micro-batches of
`batch_size` sequences; on a GPU the defaults are the config's own (per-process) batch and
accumulation, so "ms/iter" is the real iteration time on one GPU. On a CPU the full configs take
minutes per iteration, so the default is a smaller micro-batch, and the time of a full
iteration is extrapolated from the measured tokens/s ("full iter").

    python bench/bench_train.py --peer ../llama2.c                # side by side with llama2.c's train.py

With --peer (a checkout of llama2.c beside the project; nothing of it is copied here): our train.py and
llama2.c's own train.py, each as a process of its own, train the 260K shapes (32 x 512) and the 15M shapes
(16 x 256) on the same tiny random-token shards, float32, no compile, the same number of threads,
alternating ours, llama2.c's, ours, ... (--repeats rounds) so that load from other processes hits both
alike. Each reports its own time per iteration in its log (loader, forward, backward, clipping, AdamW and
the log line included); a run's figure is the median after --warmup iterations, and the ratio is the
median of the ratios of neighbouring runs, with their range.
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repo root

import train  # noqa: E402
from configurator import ConfigError, parse_config  # noqa: E402
from llamatiny import cpu_kernels, runtime, settings  # noqa: E402  (after the path tweak: bench/ runs as a script)
from model import ModelArgs, Transformer  # noqa: E402

CONFIGS = ["260k", "15m", "42m", "110m"]
CPU_BATCH = {"260k": 32, "15m": 16, "42m": 2, "110m": 1}  # small enough for seconds per step on 2 cores


def bench_config(name: str, args) -> dict:
    path = os.path.join(os.path.dirname(train.__file__), "config", f"train_{name}.py")
    overrides = [f"--device={args.device}", f"--dtype={args.dtype}", f"--compile={args.compile}"]
    c = settings.resolve_config(parse_config(train.default_config(), [path] + overrides + args.settings))
    device, device_type = c["device"], c["device"].split(":")[0]
    on_gpu = device_type == "cuda"
    batch = args.batch_size or (c["batch_size"] if on_gpu else CPU_BATCH[name])
    accum = args.accum or (c["gradient_accumulation_steps"] // args.world_size if on_gpu else 1)
    T = c["max_seq_len"]

    torch.manual_seed(0)
    if on_gpu:
        torch.cuda.empty_cache()  # what a config that failed before this one left behind
        torch.set_float32_matmul_precision("high")
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[c["dtype"]]
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    raw_model = Transformer(ModelArgs.from_dict(c)).to(device)
    if c["cpu_speedups"] and device_type == "cpu":
        cpu_kernels.attach(raw_model)
    optimizer = raw_model.configure_optimizers(c["weight_decay"], c["learning_rate"],
                                               (c["beta1"], c["beta2"]), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=c["dtype"] == "float16")
    if c["compile"]:
        # a fresh dynamo for each config: each figure is one config's own static graph, as in a user's run
        # (otherwise the 2nd-4th configs recompile with dynamic shapes), compiled as train.py compiles it, so
        # that a train.py run at the same shape afterwards finds it in the compile cache
        torch._dynamo.reset()
    model = torch.compile(raw_model) if c["compile"] else raw_model
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
        "config": name, "params": raw_model.num_params(), "step": f"{batch}x{T}x{accum}",
        "ms_iter": dt * 1000, "tok_s": tokens / dt,
        "mfu": raw_model.estimate_mfu(tokens, dt, peak) if peak else None,
        "full_iter_s": full_tokens / args.world_size / (tokens / dt),
        "mem_gb": torch.cuda.max_memory_allocated() / 1e9 if on_gpu else None,
    }


# ----------------------------------------------------------------- side by side with llama2.c's train.py

PEER_SHAPES = {  # name -> the settings both train.py's take alike: model shape and micro-batch
    "260k": dict(vocab_source="custom", vocab_size=512, dim=64, n_layers=5, n_heads=8, n_kv_heads=4,
                 multiple_of=4, max_seq_len=512, batch_size=32),
    "15m": dict(vocab_source="llama2", vocab_size=32000, dim=288, n_layers=6, n_heads=6, n_kv_heads=6,
                multiple_of=32, max_seq_len=256, batch_size=16),
}
OURS_ITER = re.compile(r"^iter (\d+) \| loss ([\d.]+) .*?\| ([\d.]+) ms/iter", re.M)
PEER_ITER = re.compile(r"^(\d+) \| loss ([\d.]+) \| lr \S+ \| ([\d.]+)ms", re.M)


def write_shards(data_dir: Path, shape: dict, n_tokens: int = 2**19) -> None:
    # two shards of random token ids where both train.py's look for them (data00.bin: the validation split),
    # and the meta.json ours reads; llama2.c's loader only globs *.bin
    name = "TinyStories_all_data" if shape["vocab_source"] == "llama2" else f"tok{shape['vocab_size']}"
    shard_dir = data_dir / name
    shard_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        rng.integers(0, shape["vocab_size"], n_tokens, dtype=np.uint16).tofile(shard_dir / f"data{i:02d}.bin")
    meta = {"tokenizer": "random tokens", "vocab_size": shape["vocab_size"], "bos_id": 1, "eos_id": 2}
    (shard_dir / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def train_command(program: str, shape: dict, args, workdir: Path) -> tuple[list, dict]:
    flags = {**shape, "device": "cpu", "dtype": "float32", "compile": False, "gradient_accumulation_steps": 1,
             "dropout": args.dropout, "max_iters": args.iters + args.warmup, "eval_interval": 10**6,
             "eval_iters": 1, "log_interval": 1, "out_dir": str(workdir / f"out_{program}")}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # llama2.c's train.py: torch's default threads
    if program == "ours":
        flags |= {"data_dir": str(workdir / "data"), "threads": args.threads, "overwrite": True}
        script = ROOT / "train.py"
    else:
        script = Path(args.peer) / "train.py"
    return [sys.executable, str(script)] + [f"--{k}={v}" for k, v in flags.items()], env


def run_train(program: str, shape: dict, args, workdir: Path) -> tuple[float, float]:
    """One training run: (median ms per iteration after the warm-up, the first iteration's loss)."""
    cmd, env = train_command(program, shape, args, workdir)
    # llama2.c's train.py reads data/ and configurator.py from its working directory
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    found = (OURS_ITER if program == "ours" else PEER_ITER).findall(out.stdout)
    if out.returncode or len(found) < args.iters:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{(out.stdout + out.stderr)[-3000:]}")
    times = [float(ms) for _, _, ms in found[-args.iters:]]  # ours has no ms/iter for its first iteration
    return statistics.median(times), float(found[0][1])


def side_by_side(args) -> None:
    peer = Path(args.peer)
    if not (peer / "train.py").is_file() or not (peer / "configurator.py").is_file():
        sys.exit(f"error: --peer {peer} is not a llama2.c checkout (no train.py and configurator.py there); "
                 "clone https://github.com/karpathy/llama2.c and pass its folder")
    names = [n.strip() for n in (args.configs or ",".join(PEER_SHAPES)).split(",") if n.strip()]
    if unknown := [n for n in names if n not in PEER_SHAPES]:
        sys.exit(f"error: with --peer the configs are {', '.join(PEER_SHAPES)}, not {', '.join(unknown)}")
    print(f"# bench_train --peer: ours vs llama2.c's train.py ({peer}), {machine()}, float32, no compile, "
          f"{args.threads} thread(s), dropout {args.dropout}, "
          f"median ms/iter of {args.iters} after {args.warmup}, {args.repeats} rounds alternating")
    rows = []
    for name in names:
        shape = PEER_SHAPES[name]
        figures = {"ours": [], "llama2.c": []}
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            write_shards(workdir / "data", shape)
            (workdir / "configurator.py").symlink_to((peer / "configurator.py").resolve())
            for _ in range(args.repeats):
                for program in figures:
                    ms, loss = run_train(program, shape, args, workdir)
                    figures[program].append(ms)
                    print(f"  {name} {program}: {ms:.0f} ms/iter (first loss {loss:.3f})", flush=True)
        ratios = [p / o for o, p in zip(figures["ours"], figures["llama2.c"], strict=True)]
        rows.append((name, shape, figures, ratios))
    print("\n| shapes | ours ms/iter | llama2.c train.py ms/iter | speed-up (median, range) |")
    print("|---|---|---|---|")
    for name, shape, figures, ratios in rows:
        spread = {p: f"{statistics.median(v):.0f} ({min(v):.0f} - {max(v):.0f})" for p, v in figures.items()}
        print(f"| {name}, {shape['batch_size']} x {shape['max_seq_len']} | "
              f"{spread['ours']} | {spread['llama2.c']} | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f} - {max(ratios):.2f}) |")


def machine() -> str:
    # the CPU, its cores, torch and the date: what a figure needs beside it
    cpu = platform.processor() or platform.machine() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"


def parse_args(argv=None):
    # allow_abbrev off: a train.py setting such as --dim=32 must not be taken for one of these options
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", help=f"comma-separated: {','.join(CONFIGS)} (default: all; with --peer: "
                        f"{','.join(PEER_SHAPES)})")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batch_size", type=int, default=0, help="micro-batch (default: see above)")
    parser.add_argument("--accum", type=int, default=0, help="micro-batches per measured step")
    parser.add_argument("--world_size", type=int, default=1,
                        help="GPUs the recipe would run on (splits its accumulation; default 1)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first: compilation, and on a CPU the heap settling "
                             "(cpu_kernels.keep_freed_memory)")
    parser.add_argument("--peer",
                        help="a llama2.c checkout: time its train.py side by side with ours (see above)")
    parser.add_argument("--repeats", type=int, default=3, help="with --peer: rounds of ours, llama2.c's")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="with --peer: CPU threads of both (default: torch's, one per core)")
    parser.add_argument("--dropout", type=float, default=0.0, help="with --peer: both models' dropout")
    parser.add_argument("--peak_flops", default=None,
                        help="FLOP/s or GPU name for MFU (default: from the GPU)")
    args, extra = parser.parse_known_args(argv)
    if not_settings := [a for a in extra if not re.fullmatch(r"--\w+=.*", a)]:
        parser.error(f"unrecognized arguments: {' '.join(not_settings)} (train.py settings are --key=value)")
    try:
        parse_config(train.default_config(), extra)  # a misspelt setting stops here, not in every row
    except ConfigError as e:
        parser.error(str(e))
    args.settings = extra
    if args.peak_flops is not None:
        try:
            args.peak_flops = float(args.peak_flops)
        except ValueError:
            pass  # a GPU name
    return args


def failure(e: Exception) -> str:
    # a table cell: what went wrong, on one line
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of memory: lower --batch_size"
    return f"{type(e).__name__}: {runtime.first_line(e)}"[:200].replace("|", "/")


def main(argv=None):
    args = parse_args(argv)
    if args.peer:
        side_by_side(args)
        return
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        cpu_kernels.keep_freed_memory()  # as train.py's main() does: the whole process, so here
    names = [n.strip() for n in (args.configs or ",".join(CONFIGS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"error: unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")

    device = settings.resolve_config(train.default_config() | {"device": args.device})["device"]
    where = (torch.cuda.get_device_name(device) if device.startswith("cuda")
             else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    print(f"# bench_train: {where}, torch {torch.__version__}, dtype {args.dtype}, compile {args.compile}, "
          f"{args.iters} timed step(s) after {args.warmup} warm-up")
    print("| config | params | measured step (B x T x accum) | ms/iter | tokens/s | MFU | full iter (s) "
          "| peak mem |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        try:
            r = bench_config(name, args)
        except Exception as e:  # one config's failure is its row; the traceback goes to stderr
            print(f"| {name} | | {failure(e)} | | | | | |", flush=True)
            traceback.print_exc()
            continue
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['mem_gb']:.1f} GB" if r["mem_gb"] is not None else "-"
        print(f"| {r['config']} | {r['params'] / 1e6:.2f}M | {r['step']} | {r['ms_iter']:.1f} | "
              f"{r['tok_s']:,.0f} | {mfu} | {r['full_iter_s']:.2f} | {mem} |", flush=True)


if __name__ == "__main__":
    main()
