"""
train.py's settings, checked and completed before anything trains: the 'auto' and None values, the run's
length (max_iters, max_tokens or max_epochs), what a resumed run keeps from its checkpoint and a
fine-tune from its model, a batch size that fits in memory, the split of the accumulation steps across
processes, and the GPU's peak for MFU. Every problem is a ConfigError with a one-line message.
"""
import math
import os
from dataclasses import fields

import torch
import torch.distributed as dist

import lora
import memory
import runtime
from configurator import ConfigError
from model import ModelArgs
from runtime import print0

# what a resumed run takes from its checkpoint unless the setting is given again: it continues as it was
RESUMED_SETTINGS = ("dataset", "vocab_source", "batch_size", "gradient_accumulation_steps", "learning_rate",
                    "min_lr", "max_iters", "max_tokens", "max_epochs", "warmup_iters", "lr_decay_iters",
                    "decay_lr", "weight_decay", "beta1", "beta2", "grad_clip", "dtype", "seed", "lora_rank",
                    "lora_alpha", "lora_dropout", "lora_targets") + tuple(f.name for f in fields(ModelArgs))
# of the model's fields, what a resumed or fine-tuned run may change: the rest is the weights' shape
NOT_SHAPE = ("dropout", "max_seq_len")


def resolve_config(config: dict) -> dict:
    # fills in the 'auto' and None settings and checks values; the result is what the run records
    c = dict(config)
    choices = {"vocab_source": ("llama2", "custom"), "dtype": ("auto", "float32", "bfloat16", "float16")}
    for key, allowed in choices.items():
        if c[key] not in allowed:
            raise ConfigError(f"{key}={c[key]!r} is not one of {', '.join(map(repr, allowed))}")
    for key in ("init_from", "init_checkpoint"):
        if c[key] not in ("scratch", "resume", "auto", None) and not os.path.exists(c[key]):
            raise ConfigError(f"{key}={c[key]!r} is not 'scratch', 'resume', 'auto' or an existing "
                              f"checkpoint to fine-tune "
                              f"(a train.py .pt, a llama2.c .bin or a Hugging Face directory)")
    if c["init_checkpoint"] is not None and c["init_from"] != "auto":
        raise ConfigError(f"init_checkpoint={c['init_checkpoint']!r} is for init_from='auto'; to fine-tune, "
                          f"pass --init_from={c['init_checkpoint']}")
    if c["init_from"] == "auto":  # the same command continues the run once it has a checkpoint
        has_checkpoint = os.path.exists(os.path.join(c["out_dir"], "ckpt.pt"))
        c["init_from"] = "resume" if has_checkpoint else c["init_checkpoint"] or "scratch"
        c["overwrite"] = c["overwrite"] or not has_checkpoint  # what an attempt that died early left
    at_least_one = ("threads", "batch_size", "max_seq_len", "gradient_accumulation_steps", "eval_interval",
                    "log_interval", "checkpoint_interval", "eval_iters", "vocab_size", "dim", "n_layers",
                    "n_heads", "n_kv_heads", "hidden_dim", "multiple_of")
    for key in at_least_one:
        if c[key] is not None and c[key] < 1:
            raise ConfigError(f"{key}={c[key]} must be at least 1")
    c["device"] = runtime.resolve_device(c["device"])
    c["dtype"] = runtime.resolve_dtype(c["dtype"], c["device"])
    if c["log_interval"] is None:
        c["log_interval"] = 1 if c["device"] == "cpu" else 10
    if c["checkpoint_interval"] is None:
        c["checkpoint_interval"] = c["eval_interval"]
    for key in ("max_iters", "warmup_iters", "num_workers", "keep_checkpoints"):
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
        raise ConfigError(f"lr_decay_iters={c['lr_decay_iters']} is shorter than "
                          f"warmup_iters={c['warmup_iters']}; lower --warmup_iters or raise --lr_decay_iters")
    if c["max_tokens"] is not None and c["max_epochs"] is not None:
        raise ConfigError("give the run's length once: max_tokens or max_epochs (or max_iters), not both")
    for key in ("max_tokens", "max_epochs"):
        if c[key] is not None and c[key] <= 0:
            raise ConfigError(f"{key}={c[key]} must be positive")
    try:
        ModelArgs.from_dict(c)  # invalid shapes fail here, before any data is read
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return c


def settle_run_length(c: dict, given: set, tokens_per_epoch: int, iter_num: int = 0,
                      tokens_seen: int = 0) -> dict:
    """max_iters from max_tokens or max_epochs when one of them sets the run's length (the iterations that
    reach it from where a resumed run stands), then lr_decay_iters (None: max_iters)."""
    c = dict(c)
    budget = next((k for k in ("max_tokens", "max_epochs") if c[k] is not None), None)
    if budget and "max_iters" in given:
        if budget in given:
            raise ConfigError(f"give the run's length once: max_iters={c['max_iters']} "
                              f"or {budget}={c[budget]}")
        print0(f"note: max_iters={c['max_iters']} sets the run's length, not the checkpoint's "
               f"{budget}={c[budget]}")
        c[budget] = None
    elif budget:
        tokens = c["max_tokens"] if budget == "max_tokens" else round(c["max_epochs"] * tokens_per_epoch)
        tokens_per_iter = c["batch_size"] * c["gradient_accumulation_steps"] * c["max_seq_len"]
        c["max_iters"] = iter_num + max(0, math.ceil((tokens - tokens_seen) / tokens_per_iter))
    if c["lr_decay_iters"] is None:
        c["lr_decay_iters"] = c["max_iters"]
    return c


def warn_about_the_schedule(c: dict) -> None:
    # a smoke run (--max_iters=20 with a config's 1000 warmup steps) is legitimate: run it, but say so
    if c["decay_lr"] and c["max_iters"] < c["warmup_iters"]:
        reached = c["learning_rate"] * c["max_iters"] / c["warmup_iters"]  # the warmup's last step
        print0(f"warning: max_iters={c['max_iters']} ends inside warmup_iters={c['warmup_iters']}: "
               f"the learning rate only climbs to {reached:.1e} of {c['learning_rate']:.1e}; pass e.g. "
               f"--warmup_iters={max(1, c['max_iters'] // 10)} to warm up and decay within the run")


def for_resume(c: dict, saved: dict, given: set, path: str) -> dict:
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
        differ = ", ".join(f"{k}={saved[k]!r} (config: {c[k]!r})" for k in shape)
        raise ConfigError(f"{path} was trained with {differ}; a resumed run keeps the model's shape: "
                          "drop those settings, or start a new run")
    try:
        runtime.resolve_dtype(c["dtype"], c["device"])
    except ConfigError:  # a bf16 run resumed on a GPU without bf16
        kept = [k for k in kept if not k.startswith("dtype=")]
        c["dtype"] = runtime.resolve_dtype("auto", c["device"])
        changed.append(f"dtype {saved['dtype']!r} -> {c['dtype']!r} (this device)")
    if kept:
        print0(f"note: continuing with the checkpoint's {', '.join(kept)} "
               f"(give a setting again to change it)")
    if changed:
        print0(f"note: changed on resume: {', '.join(changed)}")
    return c


def for_finetune(c: dict, saved_args: dict, path: str, given: set) -> dict:
    # the model's shape is the checkpoint's; dropout and max_seq_len stay the config's, and rope_theta where
    # given (a longer context wants a larger one). The note names the shape settings given (config file or
    # command line) that the checkpoint overrules, not the defaults.
    c = dict(c)
    saved, wanted = ModelArgs.from_dict(saved_args), ModelArgs.from_dict(c)
    shape = [f.name for f in fields(ModelArgs) if f.name not in NOT_SHAPE + ("multiple_of", "rope_theta")]
    diffs = [k for k in shape if k in given and getattr(saved, k) != getattr(wanted, k)]
    if diffs:
        print0(f"note: the model's shape comes from {path}: "
               + ", ".join(f"{k}={getattr(saved, k)!r} (config: {getattr(wanted, k)!r})" for k in diffs))
    if saved.max_seq_len != c["max_seq_len"]:
        print0(f"note: training with max_seq_len={c['max_seq_len']}; "
               f"{path} was trained with {saved.max_seq_len}")
    if "rope_theta" not in given:
        c["rope_theta"] = saved.rope_theta
    elif saved.rope_theta != c["rope_theta"]:
        print0(f"note: training with rope_theta={c['rope_theta']:g}; {path} was trained with "
               f"{saved.rope_theta:g} (every position now rotates at other speeds: fine-tune long enough)")
    c.update({k: getattr(saved, k) for k in shape})
    return c


def processes_on_this_machine(device: str) -> int:
    # what shares the memory a step needs: a GPU is each process's own, a CPU's RAM is the node's
    return 1 if device.startswith("cuda") else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def choose_batch_size(c: dict, args: ModelArgs, world_size: int, device: str) -> dict:
    sequences = c["batch_size"] * c["gradient_accumulation_steps"]
    try:
        largest, how = memory.largest_batch(args, sequences // world_size, device, c["dtype"],
                                            processes_on_this_machine(device), frozen=c["lora_rank"] > 0)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if world_size > 1:  # every process takes the same micro-batch: the one with the least memory decides
        smallest = torch.tensor(largest, device=device if device.startswith("cuda") else "cpu")
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        largest = int(smallest)
    if largest == 0:
        raise ConfigError(f"batch_size=auto: not even one sequence of {args.max_seq_len} tokens fits "
                          f"({how}); use a shorter --max_seq_len or a smaller model")
    batch, accum = memory.split_batch(sequences, world_size, largest)
    print0(f"batch_size=auto: {batch} x {accum} accumulation steps = {sequences} sequences per iteration "
           f"(up to {largest} fit, {how}; "
           f"the micro-batch must divide the {sequences // world_size} per process)")
    return {"batch_size": batch, "gradient_accumulation_steps": accum}


def check_memory(c: dict, args: ModelArgs, device: str, world_size: int) -> None:
    # a step that cannot fit stops now, with a batch size that does, instead of minutes later (on a CPU,
    # killed by the kernel without a word)
    free, here = memory.available_bytes(device), processes_on_this_machine(device)
    device_type = device.split(":")[0]
    frozen = c["lora_rank"] > 0
    need = memory.step_bytes(args, c["batch_size"], c["dtype"], device_type, frozen) * here
    if free is None or need <= free:
        return
    share = 0.9 * free / here
    largest = memory.largest_that_fits(
        lambda b: memory.step_bytes(args, b, c["dtype"], device_type, frozen) <= share, c["batch_size"])
    where = f"{free / 2**30:.1f} GiB is available" + (f" to {here} processes" if here > 1 else "")
    what = (f"a training step of {c['batch_size']} x {args.max_seq_len} tokens needs about "
            f"{need / here / 2**30:.1f} GiB")
    if largest == 0:
        raise ConfigError(f"{what} even at batch_size=1 and {where}: "
                          f"use a shorter --max_seq_len or a smaller model")
    batch, accum = memory.split_batch(c["batch_size"] * c["gradient_accumulation_steps"], world_size, largest)
    raise ConfigError(f"{what} (the (batch, context, vocab) logits are most of it) but {where}: "
                      f"try --batch_size={batch} --gradient_accumulation_steps={accum} "
                      f"(the same tokens per iteration)")


def split_accumulation(steps: int, world_size: int) -> int:
    # gradient_accumulation_steps is global: the tokens per iteration do not change with the number of GPUs
    if steps % world_size:
        nearest = max(world_size, steps // world_size * world_size)
        raise ConfigError(f"gradient_accumulation_steps={steps} must be divisible by the number of processes "
                          f"({world_size}): it is the global count, split across them; try "
                          f"--gradient_accumulation_steps={nearest}")
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
