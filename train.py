"""
Trains a small Llama on TinyStories (or your own data): on a CPU, one GPU, or several under torchrun.

    python train.py config/train_cpu_debug.py                      # a tiny model, about a minute on a CPU
    python train.py config/train_15m.py --batch_size=64            # a config file, then --key=value overrides
    python train.py config/train_15m.py --init_from=resume         # continue out_dir/ckpt.pt exactly
    python train.py config/train_15m.py --init_from=stories15M.bin --out_dir=out/ft --learning_rate=1e-4 --warmup_iters=100 --max_iters=2000
    torchrun --standalone --nproc_per_node=4 train.py config/train_110m.py
    python train.py --help                                         # every setting and its default

Several nodes (the data on each; out_dir on a shared filesystem so that every node can resume):

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 train.py CONFIG
    torchrun --nnodes=2 --node_rank=1 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 train.py CONFIG
    (without InfiniBand, prefix NCCL_IB_DISABLE=1)

--init_from=PATH fine-tunes a trained model: one of our .pt checkpoints or a llama2.c model file
(llama2.c's published stories15M/42M/110M.bin need data in the Llama 2 vocabulary). Its weights and
shape are used (a note lists where the config differs); the optimizer, data and iteration count start afresh.

The settings are the plain Python names below; configurator.py explains the override rules.
gradient_accumulation_steps is the global count: each of N processes does 1/N of it, so the
tokens per iteration do not depend on the number of GPUs. Every run writes out_dir/config.json,
out_dir/metrics.jsonl (one JSON object per log line and per eval) and out_dir/ckpt.pt.
"""
import filecmp
import gc
import inspect
import json
import math
import os
import random
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields
from datetime import datetime, timezone

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import cpu_speedups as speedups  # the module; `cpu_speedups` below is the setting
import dataloader
import runtime
from configurator import ConfigError, format_config, parse_config
from model import ModelArgs, Transformer, from_checkpoint

# -----------------------------------------------------------------------------
# defaults: the 15M model of llama2.c (config/train_15m.py sets them explicitly)
# I/O
out_dir = "out"
data_dir = "data"
dataset = "tinystories"  # or the NAME of `python tinystories.py prepare --name NAME`
eval_interval = 2000  # iterations between evals (and checkpoints)
log_interval = 1
eval_iters = 100  # batches per split per process at each eval
eval_only = False  # evaluate once (the checkpoint when resuming) and exit
always_save_checkpoint = False  # False: save at an eval only when val loss improves (and always at the end)
# 'scratch'; 'resume': out_dir/ckpt.pt with its optimizer, data position and RNG, exactly where it stopped;
# or a PATH to fine-tune (a train.py .pt, a llama2.c .bin): its weights and shape, a fresh run from iteration 0
init_from = "scratch"
# wandb logging (pip install wandb)
wandb_log = False
wandb_project = "llama-tiny"
wandb_run_name = None  # None: the out_dir's name
# data
batch_size = 128  # micro-batch size per process
max_seq_len = 256
vocab_source = "llama2"  # 'llama2' (32,000 tokens) or 'custom' (data_dir/tok{vocab_size}.model)
vocab_size = 32000
num_workers = 0  # data loader worker processes
# model (the remaining ModelArgs fields, e.g. hidden_dim and rope_theta, are settable too)
dim = 288
n_layers = 6
n_heads = 6
n_kv_heads = None  # None: n_heads
multiple_of = 32
dropout = 0.0
# optimizer: AdamW
gradient_accumulation_steps = 4  # global: split across processes under DDP
learning_rate = 5e-4
max_iters = 100000  # optimizer steps
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 disables clipping
# learning rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True  # False: constant learning_rate
warmup_iters = 1000
lr_decay_iters = None  # None: max_iters
min_lr = None  # None: learning_rate / 10
# system
device = "auto"  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' (bfloat16, else float16 on CUDA; float32 elsewhere), 'float32', 'bfloat16', 'float16'
compile = False  # torch.compile the model (use it on a GPU)
cpu_speedups = True  # faster CPU kernels for the same math (cpu_speedups.py); False: the plain PyTorch path
seed = 1337
peak_flops = None  # per-device peak FLOP/s for MFU, or a GPU name ('H100'); None: from the CUDA device's name
# -----------------------------------------------------------------------------
_CONFIG_KEYS = [k for k, v in globals().items()
                if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))]

EVAL_SEED = 2_147_483_647  # eval batches come from their own fixed stream, never the first training batches


class TrainError(Exception):
    # a failure during the run that the user can act on; main() prints it as one line
    pass


def default_config() -> dict:
    config = {k: globals()[k] for k in _CONFIG_KEYS}
    # the model's other settings come from ModelArgs itself, so they are never typed twice
    for f in fields(ModelArgs):
        config.setdefault(f.name, f.default)
    return config


def print0(*args, **kwargs):
    # only rank 0 talks under torchrun
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def get_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float) -> float:
    # it counts optimizer steps from 0; step 0 already gets learning_rate / warmup_iters, never 0
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def resolve_config(config: dict) -> dict:
    # fills in the 'auto' and None settings and checks values; the result is what the run records
    c = dict(config)
    choices = {"vocab_source": ("llama2", "custom"), "dtype": ("auto", "float32", "bfloat16", "float16")}
    for key, allowed in choices.items():
        if c[key] not in allowed:
            raise ConfigError(f"{key}={c[key]!r} is not one of {', '.join(map(repr, allowed))}")
    if c["init_from"] not in ("scratch", "resume") and not os.path.exists(c["init_from"]):
        raise ConfigError(f"init_from={c['init_from']!r} is not 'scratch', 'resume' or an existing checkpoint "
                          f"to fine-tune (a train.py .pt or a llama2.c .bin)")
    for key in ("batch_size", "max_seq_len", "gradient_accumulation_steps", "eval_interval", "log_interval",
                "eval_iters", "vocab_size", "dim", "n_layers", "n_heads"):
        if c[key] < 1:
            raise ConfigError(f"{key}={c[key]} must be at least 1")
    for key in ("max_iters", "warmup_iters", "num_workers"):
        if c[key] < 0:
            raise ConfigError(f"{key}={c[key]} must not be negative")
    if c["learning_rate"] <= 0:
        raise ConfigError(f"learning_rate={c['learning_rate']} must be positive")

    if c["min_lr"] is None:
        c["min_lr"] = c["learning_rate"] / 10
    if c["lr_decay_iters"] is None:
        c["lr_decay_iters"] = c["max_iters"]
    if not isinstance(c["lr_decay_iters"], int) or not isinstance(c["min_lr"], (int, float)):
        raise ConfigError(f"lr_decay_iters must be an int and min_lr a number "
                          f"(got {c['lr_decay_iters']!r}, {c['min_lr']!r})")
    if c["decay_lr"] and c["lr_decay_iters"] < c["warmup_iters"]:
        raise ConfigError(f"lr_decay_iters={c['lr_decay_iters']} is shorter than warmup_iters={c['warmup_iters']}; "
                          f"lower --warmup_iters or raise --lr_decay_iters")

    c["device"] = runtime.resolve_device(c["device"])
    c["dtype"] = runtime.resolve_dtype(c["dtype"], c["device"])
    try:
        ModelArgs.from_dict(c)  # invalid shapes fail here, before any data is read
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return c


def split_accumulation(steps: int, world_size: int) -> int:
    # gradient_accumulation_steps is global: the tokens per iteration do not change with the number of GPUs
    if steps % world_size:
        raise ConfigError(f"gradient_accumulation_steps={steps} must be divisible by the number of processes "
                          f"({world_size}): it is the global count, split across them; try "
                          f"--gradient_accumulation_steps={max(world_size, steps // world_size * world_size)}")
    return steps // world_size


def resolve_peak_flops(setting, device_type: str):
    # None means no meaningful MFU (a CPU, an unknown GPU); numbers pass through; a GPU name is looked up
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return float(setting)
    if isinstance(setting, str):
        if (flops := runtime.peak_flops_for(setting)) is None:
            raise ConfigError(f"peak_flops={setting!r}: unknown GPU; give a number (FLOP/s) or one of "
                              + ", ".join(runtime.PEAK_FLOPS))
        return flops
    if setting is not None:
        raise ConfigError(f"peak_flops={setting!r}: give a number (FLOP/s), a GPU name, or None")
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    if (flops := runtime.peak_flops_for(name)) is None:
        print0(f"warning: no bf16 peak known for {name!r}, so no MFU is shown; pass --peak_flops=FLOP/s "
               f"(its dense bf16 tensor-core peak, e.g. --peak_flops=312e12 for an A100)")
    return flops


def save_checkpoint(path, obj) -> None:
    # to a temporary file, flushed to disk, then renamed over the old one: os.replace is atomic, so a
    # crash or a kill at any moment leaves either the previous checkpoint or the new one, never half of one
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path: str, meta: dict, shard_dir, device: str) -> dict:
    # checked against the data before anything trains: weights made for another vocabulary would
    # train on tokens that mean something else, without any error
    if not os.path.exists(path):  # (a missing fine-tuning PATH was reported by resolve_config)
        raise TrainError(f"init_from='resume' but there is no checkpoint at {path}; "
                         f"train from scratch first, or point --out_dir at the run to continue")
    try:
        _, checkpoint = from_checkpoint(path, device)
    except (ValueError, OSError) as e:  # not a checkpoint, or a truncated one; the message names the file
        raise TrainError(str(e)) from None
    n, trained = checkpoint["model_args"]["vocab_size"], checkpoint.get("config")
    if trained:  # train.py's checkpoints record the data they were trained on
        hint = (f"it was trained with --dataset={trained['dataset']} --vocab_source={trained['vocab_source']} "
                f"--vocab_size={trained['vocab_size']}")
    elif n == 32000:
        hint = ("llama2.c's stories15M/42M/110M.bin need data in the Llama 2 vocabulary: --vocab_source=llama2 "
                "--vocab_size=32000 (made by python tinystories.py pretokenize)")
    else:
        hint = f"use data made with its own {n}-token tokenizer {checkpoint.get('tokenizer') or ''}".rstrip()
    if n != meta["vocab_size"]:
        raise TrainError(f"{path} has a {n}-token vocabulary but the data in {shard_dir} was tokenized with "
                         f"{meta['vocab_size']} tokens; {hint}")
    saved, current = checkpoint.get("tokenizer"), meta["tokenizer"]
    if saved and saved != current:
        if not (os.path.isfile(saved) and os.path.isfile(current)):
            print0(f"note: {path} was trained on data from {saved}, the data now comes from {current}")
        elif not filecmp.cmp(saved, current, shallow=False):  # a copy elsewhere is the same tokenizer
            raise TrainError(f"{path} was trained with the tokenizer {saved} but the data in {shard_dir} was made "
                             f"with {current}: the same vocabulary size, different tokens; {hint}")
    return checkpoint


def get_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded onto a GPU moved it there
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                             text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def append_jsonl(path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path, last_iter: int) -> None:
    # a resumed run repeats the iterations after its checkpoint: drop the old lines for them
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["iter"] <= last_iter:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                pass  # a line cut short by a crash
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class WandbLogger:
    # imported only when asked for; any wandb failure turns it off with one warning, training goes on
    def __init__(self, config: dict, out_dir: str, resume: bool):
        self.run = None
        try:
            import wandb

            id_file = os.path.join(out_dir, "wandb_run_id")
            run_id = None  # a resumed run continues its wandb run, as its checkpoint continues the training
            if resume and os.path.exists(id_file):
                with open(id_file, encoding="utf-8") as f:
                    run_id = f.read().strip()
            self.run = wandb.init(project=config["wandb_project"], id=run_id, resume="allow" if run_id else None,
                                  name=config["wandb_run_name"] or os.path.basename(os.path.abspath(out_dir)),
                                  config=config)
            with open(id_file, "w", encoding="utf-8") as f:
                f.write(self.run.id)
        except Exception as e:
            self._disable(e)

    def log(self, data: dict, step: int) -> None:
        if self.run is not None:
            try:
                self.run.log(data, step=step)
            except Exception as e:
                self._disable(e)

    def _disable(self, e: Exception) -> None:
        print0(f"warning: wandb disabled ({type(e).__name__}: {e}); training continues")
        self.run = None


def wrap_ddp(model, device: str) -> DDP:
    # the RoPE tables are buffers computed alike on every rank: no need to broadcast them at every forward
    sync_buffers = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else "broadcast_buffers"  # the older name, deprecated in recent PyTorch
    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DDP(model, device_ids=device_ids, **{sync_buffers: False})


@torch.no_grad()
def evaluate(model, shard_dir, c, rank, world_size, device, ctx) -> dict:
    # fresh loaders with a fixed seed: the same batches at every eval, so evals compare like with like
    model.eval()
    losses = {}
    for split in ("train", "val"):
        loader = dataloader.BatchLoader(shard_dir, split, c["batch_size"], c["max_seq_len"], EVAL_SEED,
                                        vocab_size=c["vocab_size"], rank=rank, world_size=world_size,
                                        device=device)
        total = torch.zeros((), device=device)
        for _ in range(c["eval_iters"]):
            x, y = loader.next_batch()
            with ctx:
                _, loss = model(x, y)
            total += loss.float()
        if world_size > 1:
            dist.all_reduce(total)  # every rank evaluates its own batches; the mean is over all of them
        losses[split] = total.item() / (c["eval_iters"] * world_size)
    model.train()
    return losses


def train(config: dict) -> dict:
    c = resolve_config(config)

    # distributed: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size, device = 0, 1, c["device"]
    if ddp:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per process on each node
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=torch.device(device))
        else:
            dist.init_process_group(backend="gloo")
    speedups_before, speedups.ENABLED = speedups.ENABLED, c["cpu_speedups"]
    try:
        result = _train(c, ddp, rank, world_size, device)
        if ddp:
            dist.barrier()  # no rank tears down its process group while another still talks to it
        return result
    finally:
        speedups.ENABLED = speedups_before
        if ddp and dist.is_initialized():
            # DDP's reducer holds the process group; left to interpreter shutdown, gloo's threads can be
            # destroyed still running ("terminate called without an active exception", SIGABRT)
            gc.collect()
            dist.destroy_process_group()


def _train(c: dict, ddp: bool, rank: int, world_size: int, device: str) -> dict:
    master = rank == 0
    device_type = device.split(":")[0]
    accum_steps = split_accumulation(c["gradient_accumulation_steps"], world_size)  # per process
    tokens_per_iter = c["gradient_accumulation_steps"] * c["batch_size"] * c["max_seq_len"]  # global
    peak = resolve_peak_flops(c["peak_flops"], device_type)
    ckpt_path = os.path.join(c["out_dir"], "ckpt.pt")
    metrics_path = os.path.join(c["out_dir"], "metrics.jsonl")

    runtime.seed_everything(c["seed"] + rank)  # rank 0 draws the initial weights; DDP copies them to the others
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    ctx = runtime.autocast(device, c["dtype"])

    # data: the shard directory's meta.json says which tokenizer made it
    shard_dir = dataloader.dataset_dir(c["data_dir"], c["dataset"], c["vocab_source"], c["vocab_size"])
    meta = dataloader.read_meta(shard_dir)
    if meta["vocab_size"] != c["vocab_size"]:
        raise ConfigError(f"the data in {shard_dir} was tokenized with a {meta['vocab_size']}-token vocabulary but "
                          f"vocab_size={c['vocab_size']}; set --vocab_size={meta['vocab_size']} or re-tokenize")
    loader = dataloader.BatchLoader(shard_dir, "train", c["batch_size"], c["max_seq_len"], c["seed"],
                                    vocab_size=c["vocab_size"], rank=rank, world_size=world_size,
                                    device=device, num_workers=c["num_workers"])

    # model: from scratch, or from a checkpoint. 'resume' continues out_dir/ckpt.pt with everything it saved;
    # a PATH (fine-tuning) gives the weights and the shape only: a new run, from iteration 0
    resume = c["init_from"] == "resume"
    init_path = ckpt_path if resume else c["init_from"]
    checkpoint, rng_to_restore, last_saved = None, None, None
    iter_num, tokens_seen, best_val_loss = 0, 0, float("inf")
    if c["init_from"] != "scratch":
        checkpoint = load_checkpoint(init_path, meta, shard_dir, device)
        saved, wanted = ModelArgs.from_dict(checkpoint["model_args"]), ModelArgs.from_dict(c)
        # multiple_of only derives hidden_dim, which is compared itself
        diffs = [f.name for f in fields(ModelArgs)
                 if f.name != "multiple_of" and getattr(saved, f.name) != getattr(wanted, f.name)]
        describe = lambda names: ", ".join(f"{k}={getattr(saved, k)!r} (config: {getattr(wanted, k)!r})"
                                           for k in names)
        if resume and diffs:
            raise ConfigError(f"{init_path} was trained with {describe(diffs)}; resume with the run's own config "
                              f"file and settings")
        if not resume:  # fine-tuning: the shape is the checkpoint's; dropout and max_seq_len stay the config's
            shape = [f.name for f in fields(ModelArgs) if f.name not in ("dropout", "max_seq_len")]
            changed = [k for k in diffs if k in shape]
            if changed:
                print0(f"note: the model's shape comes from {init_path}: {describe(changed)}")
            if "max_seq_len" in diffs:
                print0(f"note: training with max_seq_len={c['max_seq_len']}; {init_path} was trained with "
                       f"{saved.max_seq_len}")
            c.update({k: getattr(saved, k) for k in shape})
    raw_model = Transformer(ModelArgs.from_dict(c)).to(device)
    if checkpoint is not None:
        raw_model.load_state_dict(checkpoint["model"])
    optimizer = raw_model.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]),
                                               device_type)
    # a no-op unless float16: it scales the loss so small gradients do not underflow
    scaler = torch.amp.GradScaler(device_type, enabled=c["dtype"] == "float16")
    if resume:
        iter_num, tokens_seen = checkpoint["iter_num"], checkpoint["tokens_seen"]
        best_val_loss, last_saved = checkpoint["best_val_loss"], iter_num
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        # every rank has taken the same number of batches, so rank 0's loader state places them all
        # (the loader also converts it when the number of processes or the batch shape changed)
        loader.load_state_dict(checkpoint["loader_state"])
        rng_states = checkpoint["rng_state"]  # one per rank
        if len(rng_states) == world_size:
            rng_to_restore = rng_states[rank]
        else:
            print0(f"note: {ckpt_path} was saved by {len(rng_states)} process(es), this run has {world_size}: "
                   f"the data continues where it was, the random streams (dropout) are reseeded")
            torch.manual_seed(c["seed"] + rank + iter_num * 1000)  # fresh streams, still deterministic
    checkpoint = None  # free the memory before training

    # torch.compile and DDP wrap the model; raw_model keeps the plain one for saving (no prefixes)
    model = torch.compile(raw_model) if c["compile"] else raw_model
    train_model = wrap_ddp(model, device) if ddp else model

    print0("config:\n" + format_config(c))
    if master and not c["eval_only"]:  # an eval-only run leaves out_dir as it is
        os.makedirs(c["out_dir"], exist_ok=True)
        run_info = {"config": c, "git": git_revision(), "torch": torch.__version__, "python": sys.version.split()[0],
                    "world_size": world_size, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "argv": sys.argv}
        with open(os.path.join(c["out_dir"], "config.json"), "w", encoding="utf-8") as f:
            json.dump(run_info, f, indent=2)
        if resume:
            truncate_metrics(metrics_path, iter_num)
        else:
            if os.path.exists(metrics_path):
                os.remove(metrics_path)  # a new run in this out_dir starts a new log
            if os.path.exists(ckpt_path):
                print0(f"note: {ckpt_path} will be overwritten by this new run (--init_from=resume continues it)")
    print0(f"model: {raw_model.num_params():,} parameters ({raw_model.num_params(non_embedding=True):,} "
           f"without the embedding); data: {shard_dir} ({meta['num_tokens']:,} tokens)")
    print0(f"tokens per iteration: {tokens_per_iter:,} = {world_size} process(es) x {accum_steps} accumulation "
           f"step(s) x {c['batch_size']} batch x {c['max_seq_len']} tokens; {c['max_iters']:,} iterations = "
           f"{tokens_per_iter * c['max_iters']:,} tokens; device {device}, {c['dtype']}"
           + (", compiled" if c["compile"] else ""))
    wandb = WandbLogger(c, c["out_dir"], resume) \
        if c["wandb_log"] and master and not c["eval_only"] else None

    def make_checkpoint() -> dict:
        # the RNG streams of every rank (dropout differs per rank), so each continues exactly where it was
        rng_states = [get_rng_state()]
        if ddp:
            rng_states = [None] * world_size
            dist.all_gather_object(rng_states, get_rng_state())
        return {"model": raw_model.state_dict(), "model_args": asdict(raw_model.args),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "config": c,
                "iter_num": iter_num, "tokens_seen": tokens_seen, "best_val_loss": best_val_loss,
                "loader_state": loader.state_dict(), "rng_state": rng_states, "tokenizer": meta["tokenizer"]}

    def stop_non_finite(what: str, value: float):
        kept = f"the last good checkpoint is {ckpt_path} (iteration {last_saved})" if last_saved is not None \
            else "no checkpoint was written"
        raise TrainError(f"{what} is {value} at iteration {iter_num}; training stopped and {kept}. "
                         f"Try a lower learning_rate, a grad_clip, or dtype=bfloat16/float32")

    if c["eval_only"]:
        losses = evaluate(model, shard_dir, c, rank, world_size, device, ctx)
        print0(f"eval at iteration {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        return {"iter_num": iter_num, **losses}
    if iter_num >= c["max_iters"]:
        print0(f"nothing to do: the checkpoint is at iteration {iter_num} and max_iters={c['max_iters']}")
        return {"iter_num": iter_num}
    if rng_to_restore is not None:
        set_rng_state(rng_to_restore)  # last, so that nothing above draws from the restored streams

    t_window, iters_in_window = time.perf_counter(), 0  # timing excludes evals and checkpoints
    while iter_num < c["max_iters"]:
        lr = get_lr(iter_num, c["learning_rate"], c["warmup_iters"], c["lr_decay_iters"], c["min_lr"]) \
            if c["decay_lr"] else c["learning_rate"]
        for group in optimizer.param_groups:
            group["lr"] = lr

        # gradient accumulation: accum_steps micro-batches per optimizer step on each process
        loss_sum = torch.zeros((), device=device)
        x, y = loader.next_batch()
        for micro_step in range(accum_steps):
            last = micro_step == accum_steps - 1
            # under DDP the gradients are all-reduced once, in the last micro-step's backward
            with nullcontext() if last or not ddp else train_model.no_sync():
                with ctx:
                    _, loss = train_model(x, y)
                    loss = loss / accum_steps  # gradients add up over micro-steps: this makes them a mean
                if not last:
                    x, y = loader.next_batch()  # while the GPU works on the forward pass
                scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        scaler.unscale_(optimizer)  # clip and report the true gradients, not the fp16-scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                   c["grad_clip"] if c["grad_clip"] > 0 else float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        tokens_seen += tokens_per_iter
        iters_in_window += 1

        if iter_num % c["log_interval"] == 0 or iter_num == c["max_iters"]:
            if ddp:
                dist.all_reduce(loss_sum)  # SUM (gloo has no AVG): the mean over ranks of the micro-step means
                loss_sum /= world_size
            lossf = loss_sum.item()  # waits for the GPU, so the time below is real
            dt = (time.perf_counter() - t_window) / iters_in_window
            norm = grad_norm.item()
            if not math.isfinite(lossf):
                stop_non_finite("the training loss", lossf)
            if not math.isfinite(norm) and not scaler.is_enabled():  # fp16's scaler skips such steps itself
                stop_non_finite("the gradient norm", norm)
            tok_per_s = tokens_per_iter / dt
            mfu = raw_model.estimate_mfu(tokens_per_iter // world_size, dt, peak) if peak else None
            print0(f"iter {iter_num} | loss {lossf:.4f} | lr {lr:.2e} | grad norm {norm:.3f} | "
                   f"{dt * 1000:.1f} ms/iter | {tok_per_s:,.0f} tokens/s | "
                   + (f"MFU {mfu * 100:.1f}%" if mfu is not None else "MFU -"))
            record = {"iter": iter_num, "tokens": tokens_seen, "loss": lossf, "lr": lr, "grad_norm": norm,
                      "dt_ms": dt * 1000, "tok_per_s": tok_per_s, "mfu": mfu}
            if master:
                append_jsonl(metrics_path, record)
            if wandb:
                wandb.log(record, step=iter_num)
            t_window, iters_in_window = time.perf_counter(), 0

        if iter_num % c["eval_interval"] == 0 or iter_num == c["max_iters"]:
            losses = evaluate(model, shard_dir, c, rank, world_size, device, ctx)
            for split, value in losses.items():
                if not math.isfinite(value):
                    stop_non_finite(f"the {split} loss", value)
            print0(f"eval iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            record = {"iter": iter_num, "tokens": tokens_seen, "train_loss": losses["train"], "val_loss": losses["val"]}
            if master:
                append_jsonl(metrics_path, record)
            if wandb:
                wandb.log(record, step=iter_num)
            improved = losses["val"] < best_val_loss
            best_val_loss = min(best_val_loss, losses["val"])
            if improved or c["always_save_checkpoint"] or iter_num == c["max_iters"]:
                checkpoint = make_checkpoint()  # a collective under DDP: every rank takes part
                if master:
                    save_checkpoint(ckpt_path, checkpoint)
                    print0(f"saved {ckpt_path} (iteration {iter_num})")
                checkpoint, last_saved = None, iter_num
            t_window, iters_in_window = time.perf_counter(), 0

    print0(f"done: {iter_num} iterations, {tokens_seen:,} tokens, best val loss {best_val_loss:.4f}")
    return {"iter_num": iter_num, "best_val_loss": best_val_loss}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("settings and their defaults:\n" + format_config(default_config()))
        return
    config = None
    try:
        config = parse_config(default_config(), argv)
        if config["cpu_speedups"] and runtime.resolve_device(config["device"]) == "cpu":
            speedups.keep_freed_memory()  # process-wide, hence here and not inside train()
        train(config)
    except (ConfigError, TrainError, dataloader.DataError) as e:
        sys.exit(f"error: {e}")
    except torch.cuda.OutOfMemoryError:
        b, a = config["batch_size"], config["gradient_accumulation_steps"]
        sys.exit(f"error: CUDA out of memory with batch_size={b} (x {config['max_seq_len']} tokens per micro-batch); "
                 f"try --batch_size={max(b // 2, 1)} --gradient_accumulation_steps={a * 2} (the same tokens per "
                 f"iteration), or a shorter max_seq_len")
    except KeyboardInterrupt:
        sys.exit("interrupted; the last checkpoint (if any) is intact: --init_from=resume continues from it")


if __name__ == "__main__":
    main()
