"""
Trains a small Llama on TinyStories (or your own data): on a CPU, one GPU, or several under torchrun.

    python train.py config/train_cpu_debug.py                      # a tiny model, about a minute on a CPU
    python train.py config/train_15m.py --batch_size=64            # a config file, then --key=value overrides
    python train.py config/train_15m.py --init_from=resume         # continue out_dir/ckpt.pt exactly
    python train.py config/train_15m.py --init_from=stories15M.bin --out_dir=out/ft --learning_rate=1e-4
    python train.py config/train_15m.py --init_from=stories15M.bin --out_dir=out/lora --lora_rank=8  # LoRA
    torchrun --standalone --nproc_per_node=4 train.py config/train_110m.py
    python train.py --help                                         # every setting and its default

Several nodes (the data on each; out_dir on a shared filesystem so that every node can resume):

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 train.py CONFIG
    torchrun --nnodes=2 --node_rank=1 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 train.py CONFIG
    (without InfiniBand, prefix NCCL_IB_DISABLE=1)

--init_from=PATH fine-tunes a trained model: one of our .pt checkpoints, a llama2.c model file or a Hugging
Face directory (llama2.c's published stories15M/42M/110M.bin need data in the Llama 2 vocabulary). Its
weights and shape are used (a note lists where the config differs); the optimizer, data and iteration
count start afresh. With --lora_rank=8 only low-rank adapters beside the frozen weights train (lora.py),
and the checkpoint holds them and names the base. --init_from=resume continues out_dir/ckpt.pt with the
settings it was trained with: a setting given again on the command line (or in a config file) replaces the
checkpoint's, with a note.

The settings are the plain Python names below; configurator.py explains the override rules.
gradient_accumulation_steps is the global count: each of N processes does 1/N of it, so the
tokens per iteration do not depend on the number of GPUs. Every run writes out_dir/config.json,
out_dir/metrics.jsonl (one JSON object per log line and per eval) and out_dir/ckpt.pt (runs.py).
"""
import filecmp
import gc
import inspect
import math
import os
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import cpu_speedups as speedups  # the module; `cpu_speedups` below is the setting
import lora
import runs
import runtime
import tinystories
from checkpoint import from_checkpoint, save_checkpoint
from configurator import ConfigError, format_config, parse_config
from model import ModelArgs, Transformer

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
# or a PATH to fine-tune (a train.py .pt, a llama2.c .bin, an HF directory): a fresh run from iteration 0
init_from = "scratch"
# LoRA (lora.py), with --init_from=PATH: the weights stay frozen and low-rank adapters beside them train
lora_rank = 0  # 0: off (every weight trains); e.g. 8: the adapters' rank
lora_alpha = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = ",".join(lora.TARGETS)  # the weights that get adapters: wq,wk,wv,wo (attention), w1,w2,w3
# wandb logging (pip install wandb)
wandb_log = False
wandb_project = "llama-tiny"
wandb_run_name: str | None = None  # None: the out_dir's name
# data
batch_size = 128  # micro-batch size per process
vocab_source = "llama2"  # 'llama2' (32,000 tokens) or 'custom' (data_dir/tok{vocab_size}.model)
num_workers = 0  # data loader worker processes
# model: every field of ModelArgs (model.py) is a setting, with its default (the 15M model): dim,
# n_layers, n_heads, n_kv_heads, vocab_size, hidden_dim, multiple_of, norm_eps, max_seq_len, dropout, rope_theta
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
lr_decay_iters: int | None = None  # None: max_iters
min_lr: float | None = None  # None: learning_rate / 10
# system
device = "auto"  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' (bfloat16, else float16 on CUDA; float32 elsewhere), 'float32', 'bfloat16', 'float16'
compile = False  # torch.compile the model (use it on a GPU)
cpu_speedups = True  # faster CPU kernels for the same math (cpu_speedups.py); False: the plain PyTorch path
seed = 1337
peak_flops: float | str | None = None  # the GPU's peak FLOP/s for MFU, or its name ('H100'); None: looked up
# -----------------------------------------------------------------------------
_CONFIG_KEYS = [k for k, v in globals().items()
                if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))]

EVAL_SEED = 2_147_483_647  # eval batches come from their own fixed stream, never the first training batches
# what a resumed run takes from its checkpoint unless the setting is given again: it continues as it was
RESUMED_SETTINGS = ("dataset", "vocab_source", "batch_size", "gradient_accumulation_steps", "learning_rate",
                    "min_lr", "max_iters", "warmup_iters", "lr_decay_iters", "decay_lr", "weight_decay", "beta1",
                    "beta2", "grad_clip", "dtype", "seed", "lora_rank", "lora_alpha", "lora_dropout",
                    "lora_targets") + tuple(f.name for f in fields(ModelArgs))
# of the model's fields, what a resumed or fine-tuned run may change: the rest is the weights' shape
NOT_SHAPE = ("dropout", "max_seq_len")


class TrainError(Exception):
    # a failure during the run that the user can act on; main() prints it as one line
    pass


def default_config() -> dict:
    config = {k: globals()[k] for k in _CONFIG_KEYS}
    for f in fields(ModelArgs):  # the model's settings come from ModelArgs itself, never typed twice
        config.setdefault(f.name, f.default)
    return config


def setting_types() -> dict:
    # what a None default may become: --n_kv_heads=abc is an error here, not a crash later
    hints = typing.get_type_hints(ModelArgs) | typing.get_type_hints(sys.modules[__name__])
    defaults = default_config()
    return {k: t for k, t in hints.items() if k in defaults and defaults[k] is None}


def parse_settings(argv: list[str]) -> dict:
    return parse_config(default_config(), argv, setting_types())


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
                          f"to fine-tune (a train.py .pt, a llama2.c .bin or a Hugging Face directory)")
    at_least_one = ("batch_size", "max_seq_len", "gradient_accumulation_steps", "eval_interval", "log_interval",
                    "eval_iters", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim",
                    "multiple_of")
    for key in at_least_one:
        if c[key] is not None and c[key] < 1:
            raise ConfigError(f"{key}={c[key]} must be at least 1")
    for key in ("max_iters", "warmup_iters", "num_workers"):
        if c[key] < 0:
            raise ConfigError(f"{key}={c[key]} must not be negative")
    for key in ("learning_rate", "norm_eps", "rope_theta"):
        if c[key] <= 0:
            raise ConfigError(f"{key}={c[key]} must be positive")
    if not 0 <= c["dropout"] < 1:
        raise ConfigError(f"dropout={c['dropout']} must be in [0, 1)")
    lora.check_settings(c)

    if c["min_lr"] is None:
        c["min_lr"] = c["learning_rate"] / 10
    if c["decay_lr"] and c["lr_decay_iters"] is not None and c["lr_decay_iters"] < c["warmup_iters"]:
        raise ConfigError(f"lr_decay_iters={c['lr_decay_iters']} is shorter than warmup_iters={c['warmup_iters']}; "
                          f"lower --warmup_iters or raise --lr_decay_iters")
    if c["lr_decay_iters"] is None:
        c["lr_decay_iters"] = c["max_iters"]
    c["device"] = runtime.resolve_device(c["device"])
    c["dtype"] = runtime.resolve_dtype(c["dtype"], c["device"])
    try:
        ModelArgs.from_dict(c)  # invalid shapes fail here, before any data is read
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return c


def warn_about_the_schedule(c: dict) -> None:
    # a smoke run (--max_iters=20 with a config's 1000 warmup steps) is legitimate: run it, but say so
    if c["decay_lr"] and c["max_iters"] < c["warmup_iters"]:
        reached = get_lr(c["max_iters"] - 1, c["learning_rate"], c["warmup_iters"], c["lr_decay_iters"], c["min_lr"])
        print0(f"warning: max_iters={c['max_iters']} ends inside warmup_iters={c['warmup_iters']}: the learning "
               f"rate only climbs to {reached:.1e} of {c['learning_rate']:.1e}; pass e.g. "
               f"--warmup_iters={max(1, c['max_iters'] // 10)} to warm up and decay within the run")


def settings_for_resume(c: dict, saved: dict, given: set, path: str) -> dict:
    """The settings a resumed run continues with: the checkpoint's, except those given again."""
    c = dict(c)
    changed, kept = [], []
    for key in RESUMED_SETTINGS:
        if key not in saved or saved[key] == c[key]:
            continue
        if key in given:
            changed.append(f"{key} {saved[key]!r} -> {c[key]!r}")
        else:
            kept.append(f"{key}={saved[key]!r}")
            c[key] = saved[key]
    # (a different vocab_size is left to check_vocabulary, which says which data the model needs)
    shape_keys = {f.name for f in fields(ModelArgs)} - set(NOT_SHAPE) - {"vocab_size"}
    shape_keys |= {"lora_rank", "lora_targets"}  # the adapters' shape
    shape = [k.split()[0] for k in changed if k.split()[0] in shape_keys]
    if shape:
        raise ConfigError(f"{path} was trained with " + ", ".join(f"{k}={saved[k]!r} (config: {c[k]!r})" for k in shape)
                          + "; a resumed run keeps the model's shape: drop those settings, or start a new run")
    try:
        runtime.resolve_dtype(c["dtype"], c["device"])
    except ConfigError:  # a bf16 run resumed on a GPU without bf16
        kept = [k for k in kept if not k.startswith("dtype=")]
        changed.append(f"dtype {saved['dtype']!r} -> {runtime.resolve_dtype('auto', c['device'])!r} (this device)")
        c["dtype"] = runtime.resolve_dtype("auto", c["device"])
    if kept:
        print0(f"note: continuing with the checkpoint's {', '.join(kept)} (give a setting again to change it)")
    if changed:
        print0(f"note: changed on resume: {', '.join(changed)}")
    return c


def settings_for_finetune(c: dict, saved_args: dict, path: str) -> dict:
    # the model's shape is the checkpoint's; dropout and max_seq_len stay the config's
    c = dict(c)
    saved, wanted = ModelArgs.from_dict(saved_args), ModelArgs.from_dict(c)
    shape = [f.name for f in fields(ModelArgs) if f.name not in NOT_SHAPE + ("multiple_of",)]
    diffs = [k for k in shape if getattr(saved, k) != getattr(wanted, k)]  # multiple_of only derives hidden_dim
    if diffs:
        print0(f"note: the model's shape comes from {path}: "
               + ", ".join(f"{k}={getattr(saved, k)!r} (config: {getattr(wanted, k)!r})" for k in diffs))
    if saved.max_seq_len != c["max_seq_len"]:
        print0(f"note: training with max_seq_len={c['max_seq_len']}; {path} was trained with {saved.max_seq_len}")
    c.update({k: getattr(saved, k) for k in shape})
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


def read_checkpoint(path: str, device: str, merge_lora: bool = True) -> dict:
    if not os.path.exists(path):  # (a missing fine-tuning PATH was reported by resolve_config)
        raise TrainError(f"init_from='resume' but there is no checkpoint at {path}; "
                         f"train from scratch first, or point --out_dir at the run to continue")
    try:
        return from_checkpoint(path, device, merge=merge_lora)[1]
    except (ValueError, OSError) as e:  # not a checkpoint, or a truncated one; the message names the file
        raise TrainError(str(e)) from None


def check_vocabulary(checkpoint: dict, path: str, meta: dict, shard_dir) -> None:
    # weights made for another vocabulary would train on tokens that mean something else, without any error
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


def open_dataset(c: dict):
    # the shard directory's meta.json says which tokenizer made it
    shard_dir = tinystories.dataset_dir(c["data_dir"], c["dataset"], c["vocab_source"], c["vocab_size"])
    meta = tinystories.read_meta(shard_dir)
    if meta["vocab_size"] != c["vocab_size"]:
        raise ConfigError(f"the data in {shard_dir} was tokenized with a {meta['vocab_size']}-token vocabulary but "
                          f"vocab_size={c['vocab_size']}; set --vocab_size={meta['vocab_size']} or re-tokenize")
    return shard_dir, meta


def setup_distributed(c: dict):
    # torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; returns (ddp, rank, world_size, device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False, 0, 1, c["device"]
    rank, world_size, device = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), c["device"]
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per process on each node
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=torch.device(device))
    else:
        dist.init_process_group(backend="gloo")
    return True, rank, world_size, device


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
        loader = tinystories.BatchLoader(shard_dir, split, c["batch_size"], c["max_seq_len"], EVAL_SEED,
                                         rank=rank, world_size=world_size, device=device)
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
    """Runs training with config (train.py's settings, e.g. from parse_settings); returns the final figures.
    config.given, when present, names the settings the user set; a plain dict counts every non-None one."""
    given = getattr(config, "given", None)
    if given is None:
        given = {k for k, v in config.items() if v is not None}
    c = resolve_config(config)
    ddp, rank, world_size, device = setup_distributed(c)
    speedups_before, speedups.ENABLED = speedups.ENABLED, c["cpu_speedups"]
    try:
        result = run(c, given, ddp, rank, world_size, device)
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


def run(c: dict, given: set, ddp: bool, rank: int, world_size: int, device: str) -> dict:
    master = rank == 0
    device_type = device.split(":")[0]
    ckpt_path = os.path.join(c["out_dir"], "ckpt.pt")
    metrics_path = os.path.join(c["out_dir"], "metrics.jsonl")

    # the settings: a resumed run continues with its checkpoint's; a fine-tune takes the model's shape
    resume = c["init_from"] == "resume"
    checkpoint = None
    if resume:
        checkpoint = read_checkpoint(ckpt_path, device, merge_lora=False)  # a LoRA run's base and adapters
        c = settings_for_resume(c, checkpoint.get("config") or {}, given, ckpt_path)
    shard_dir, meta = open_dataset(c)
    if c["init_from"] != "scratch":
        init_path = ckpt_path if resume else c["init_from"]
        checkpoint = checkpoint or read_checkpoint(init_path, device)
        check_vocabulary(checkpoint, init_path, meta, shard_dir)
        if not resume:
            c = settings_for_finetune(c, checkpoint["model_args"], init_path)
    warn_about_the_schedule(c)
    accum_steps = split_accumulation(c["gradient_accumulation_steps"], world_size)  # per process
    tokens_per_iter = c["gradient_accumulation_steps"] * c["batch_size"] * c["max_seq_len"]  # global
    peak = resolve_peak_flops(c["peak_flops"], device_type)
    ctx = runtime.autocast(device, c["dtype"])
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls

    # the model, the optimizer and the data, restored from the checkpoint when resuming
    runtime.seed_everything(c["seed"] + rank)  # rank 0 draws the initial weights; DDP copies them to the others
    raw_model = Transformer(ModelArgs.from_dict(c)).to(device)
    if checkpoint is not None:
        raw_model.load_state_dict(checkpoint["model"])  # a resumed LoRA run: its base's weights
    lora_base = None  # LoRA: the base model's path and hash; the adapters are attached to raw_model
    if c["lora_rank"]:
        lora_base = lora.attach_for_training(raw_model, c, checkpoint if resume else None)
    optimizer = raw_model.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]),
                                               device_type)
    # a no-op unless float16: it scales the loss so small gradients do not underflow
    scaler = torch.amp.GradScaler(device_type, enabled=c["dtype"] == "float16")
    loader = tinystories.BatchLoader(shard_dir, "train", c["batch_size"], c["max_seq_len"], c["seed"], rank=rank,
                                     world_size=world_size, device=device, num_workers=c["num_workers"])
    iter_num, tokens_seen, best_val_loss, last_saved, rng_to_restore = 0, 0, float("inf"), None, None
    if resume:
        iter_num, tokens_seen = checkpoint["iter_num"], checkpoint["tokens_seen"]
        best_val_loss, last_saved = checkpoint["best_val_loss"], iter_num
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler.is_enabled() and checkpoint["scaler"]:  # a bf16 or float32 run saved an empty state
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
        print0(f"resuming from iteration {iter_num:,} ({tokens_seen:,} tokens) of {ckpt_path}")
    checkpoint = None  # free the memory before training

    # torch.compile and DDP wrap the model; raw_model keeps the plain one for saving (no prefixes)
    model = torch.compile(raw_model) if c["compile"] else raw_model
    train_model = wrap_ddp(model, device) if ddp else model

    print0("config:\n" + format_config(c))
    if master and not c["eval_only"]:  # an eval-only run leaves out_dir as it is
        os.makedirs(c["out_dir"], exist_ok=True)
        runs.write_run_info(c["out_dir"], c, world_size)
        if resume:
            runs.truncate_metrics(metrics_path, iter_num)
        else:
            if os.path.exists(metrics_path):
                os.remove(metrics_path)  # a new run in this out_dir starts a new log
            if os.path.exists(ckpt_path):
                print0(f"note: {ckpt_path} will be overwritten by this new run (--init_from=resume continues it)")
    print0(f"model: {raw_model.num_params():,} parameters ({raw_model.num_params(non_embedding=True):,} "
           f"without the embedding); data: {shard_dir} ({meta['num_tokens']:,} tokens)")
    if lora_base:
        print0(lora.summary(raw_model) + f"; base {lora_base['path']}")
    print0(f"tokens per iteration: {tokens_per_iter:,} = {world_size} process(es) x {accum_steps} accumulation "
           f"step(s) x {c['batch_size']} batch x {c['max_seq_len']} tokens; {c['max_iters']:,} iterations = "
           f"{tokens_per_iter * c['max_iters']:,} tokens; device {device}, {c['dtype']}"
           + (", compiled" if c["compile"] else ""))
    wandb = runs.WandbLogger(c, c["out_dir"], resume, say=print0) \
        if c["wandb_log"] and master and not c["eval_only"] else None

    def log(record: dict) -> None:
        if master:
            runs.append_jsonl(metrics_path, record)
        if wandb:
            wandb.log(record, step=iter_num)

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
        runs.set_rng_state(rng_to_restore)  # last, so that nothing above draws from the restored streams

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
            log({"iter": iter_num, "tokens": tokens_seen, "loss": lossf, "lr": lr, "grad_norm": norm,
                 "dt_ms": dt * 1000, "tok_per_s": tok_per_s, "mfu": mfu})
            t_window, iters_in_window = time.perf_counter(), 0

        if iter_num % c["eval_interval"] == 0 or iter_num == c["max_iters"]:
            losses = evaluate(model, shard_dir, c, rank, world_size, device, ctx)
            for split, value in losses.items():
                if not math.isfinite(value):
                    stop_non_finite(f"the {split} loss", value)
            print0(f"eval iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            log({"iter": iter_num, "tokens": tokens_seen, "train_loss": losses["train"], "val_loss": losses["val"]})
            improved = losses["val"] < best_val_loss
            best_val_loss = min(best_val_loss, losses["val"])
            if improved or c["always_save_checkpoint"] or iter_num == c["max_iters"]:
                # the RNG streams of every rank (dropout differs per rank), so each continues exactly
                rng_states = [runs.get_rng_state()]
                if ddp:
                    rng_states = [None] * world_size
                    dist.all_gather_object(rng_states, runs.get_rng_state())  # every rank takes part
                if master:
                    save_checkpoint(ckpt_path, {
                        **lora.checkpoint_entries(raw_model, lora_base), "model_args": asdict(raw_model.args),
                        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "config": c,
                        "iter_num": iter_num, "tokens_seen": tokens_seen, "best_val_loss": best_val_loss,
                        "loader_state": loader.state_dict(), "rng_state": rng_states, "tokenizer": meta["tokenizer"]})
                    print0(f"saved {ckpt_path} (iteration {iter_num})")
                last_saved = iter_num
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
        config = parse_settings(argv)
        if config["cpu_speedups"] and runtime.resolve_device(config["device"]) == "cpu":
            speedups.keep_freed_memory()  # process-wide, hence here and not inside train()
        train(config)
    except (ConfigError, TrainError, tinystories.DataError) as e:
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
