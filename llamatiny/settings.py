"""
train.py's settings, checked and completed before anything trains, in one order: parsed (configurator.py,
which records where each came from), merged with a resumed run's checkpoint (for_resume), resolved (the
'auto' and None values, the run's length: max_iters, max_tokens or max_epochs) and checked, once. Also what a
fine-tune takes from its model, the split of the accumulation steps across processes, and the GPU's peak for
MFU. Every problem is a ConfigError with a one-line message that names the setting and where its value came
from.

The memory a training step needs comes last: a step that cannot fit stops at once with the batch size that
does (on a CPU the kernel would otherwise kill the process minutes later, without a word), and
`--batch_size=auto` picks the micro-batch for the machine. On a GPU the choice is measured, with real
steps at the run's context and dtype; on a CPU, where running out of memory kills the process instead
of raising an error, it comes from the estimate.
"""
import gc
import math
import os
from dataclasses import fields

import torch
import torch.distributed as dist

from configurator import COMMAND_LINE, DEFAULT, Config, ConfigError
from llamatiny import lora, runs, runtime
from llamatiny.runtime import print0
from model import INIT_SCHEMES, ModelArgs, Transformer

CHECKPOINT = "checkpoint"  # where a resumed run's settings came from, beside configurator's sources
# what describes this process rather than the run, auto_batch_size included (the split of the run's
# sequences per iteration that fits this machine's memory; max_batch_size, given again, grows the batch again,
# and without it a resumed run keeps the batch it chose): a resumed run takes every other setting from its
# checkpoint (model, data and data_dir, batch, schedule, evals, checkpoints, logging, seed, LoRA, wandb), so
# that it continues as it was with or without its config file
THIS_PROCESS = ("out_dir", "init_from", "init_checkpoint", "overwrite", "eval_only", "device", "compile",
                "cpu_speedups", "threads", "num_workers", "auto_batch_size", "max_batch_size", "print_model",
                "peak_flops")
RUN_LENGTH = ("max_iters", "max_tokens", "max_epochs")  # one of them is the run's length
# the settings that resolution fills in, kept as given beside the resolved ones (ckpt.pt, config.json): a
# resumed run derives min_lr from its learning rate again, checkpoint_interval from its eval_interval,
# log_interval and dtype from its device
AS_GIVEN = ("min_lr", "lr_decay_iters", "max_iters", "log_interval", "checkpoint_interval", "dtype")
# of the model's fields, what a resumed or fine-tuned run may change: the rest is the weights' shape
NOT_SHAPE = ("dropout", "max_seq_len")
# other projects' names for ours, for the "did you mean" (nanoGPT's; llama2.c's are ours)
RENAMED = {"n_embd": "dim", "n_layer": "n_layers", "n_head": "n_heads", "block_size": "max_seq_len"}
# settings of llama2.c and nanoGPT that have nothing to do here: accepted, with a note that says why
IGNORED = {"always_save_checkpoint": "ckpt.pt is written every checkpoint_interval iterations (at each eval "
                                     "by default) whatever the val loss, and ckpt_best.pt at each better one"}


# LLAMA_TINY_SMOKE_TEST=1: every train.py command runs as written at a size that takes seconds on a CPU, to
# check that a checkout and a list of commands work (tests/test_readme.py runs the README's lines so)
SMOKE_TEST = "LLAMA_TINY_SMOKE_TEST"
SMOKE_MODEL = {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "hidden_dim": None, "multiple_of": 16,
               "max_seq_len": 32}
# counts of iterations or batches, and what each is divided by: a run's length by 2000 and the intervals in
# it by 200 (a 100,000-iteration run: 50 iterations, 5 evals), all alike, so that a run, its resume and its
# fine-tunes compare as they do at full size
SMOKE_COUNTS = {"max_iters": 2000, "warmup_iters": 2000, "lr_decay_iters": 2000, "eval_interval": 200,
                "checkpoint_interval": 200, "eval_iters": 1000, "gradient_accumulation_steps": 4}


def smoke_test() -> bool:
    return os.environ.get(SMOKE_TEST, "") not in ("", "0")


def shrunk_for_smoke_test(config: Config) -> Config:
    """The settings as given, made tiny under LLAMA_TINY_SMOKE_TEST, whatever set them: the model's shape,
    the micro-batch (a sixteenth) and the counts (SMOKE_COUNTS, rounded up); the vocabulary becomes the
    data's (open_dataset in train.py)."""
    if not smoke_test():
        return config
    c = Config(config, config.source, config.notes)
    c.update(SMOKE_MODEL)
    c["batch_size"] = -(-c["batch_size"] // 16)
    for key, divisor in SMOKE_COUNTS.items():
        if c[key] is not None:
            c[key] = -(-c[key] // divisor)
    return c


def where(source: dict, key: str) -> str:
    # " (command line)", " (config/train_15m.py)", " (the checkpoint's)"; "" for a plain dict's settings
    if key not in source:
        return ""
    return " (the checkpoint's)" if source[key] == CHECKPOINT else f" ({source[key]})"


def as_given(config: dict) -> dict:
    return {k: config[k] for k in AS_GIVEN}


def resume_path(config: dict) -> str | None:
    # out_dir/ckpt.pt when this run continues it: init_from='resume', or 'auto' and there is one
    path = os.path.join(config["out_dir"], "ckpt.pt")
    resumes = config["init_from"] == "resume" or (config["init_from"] == "auto" and os.path.exists(path))
    return path if resumes else None


def no_checkpoint_yet(out_dir: str, previous: str) -> str:
    # what a run killed before its first checkpoint left, and the one way on from it
    return (f"{out_dir} holds a run that stopped before its first checkpoint ({previous}): --overwrite=True "
            f"starts it again (so does --init_from=auto), or pass another --out_dir")


def _run_length(c: dict, source: dict) -> str:
    # the setting that sets the run's length: of max_iters, max_tokens and max_epochs, the one given last (the
    # command line, then a resumed run's checkpoint, then a config file, then the defaults: whichever of the
    # three each gives replaces the others). Two from one place are an error, except that a budget beats the
    # default max_iters (a plain dict's settings have no sources: they count as defaults)
    precedence = {DEFAULT: 0, CHECKPOINT: 2, COMMAND_LINE: 3}  # a config file: 1
    rank = lambda key: precedence.get(source.get(key, DEFAULT), 1)
    candidates = [k for k in ("max_tokens", "max_epochs", "max_iters") if c[k] is not None]
    top = max(map(rank, candidates))
    first = [k for k in candidates if rank(k) == top]
    if top == 0 and len(first) > 1:  # a budget over the default max_iters
        first.remove("max_iters")
    if len(first) > 1:
        raise ConfigError("give the run's length once: "
                          + " or ".join(f"{k}={c[k]!r}{where(source, k)}" for k in first))
    return first[0]


def resolve_config(config: dict) -> dict:
    # fills in the 'auto' and None settings and checks values; the result is what the run records
    c, source = dict(config), getattr(config, "source", {})
    named = lambda key: f"{key}={c[key]!r}{where(source, key)}"
    for note in getattr(config, "notes", ()):
        print0(note)
    choices = {"vocab_source": ("llama2", "custom"), "dtype": ("auto", "float32", "bfloat16", "float16"),
               "weight_init": tuple(INIT_SCHEMES), "optimizer": ("adamw", "muon"),
               "lr_schedule": ("cosine", "wsd")}
    for key, allowed in choices.items():
        if c[key] not in allowed:
            raise ConfigError(f"{named(key)} is not one of {', '.join(map(repr, allowed))}")
    for key in ("init_from", "init_checkpoint"):
        if c[key] not in ("scratch", "resume", "auto", None) and not os.path.exists(c[key]):
            raise ConfigError(f"{named(key)} is not 'scratch', 'resume', 'auto' or an existing "
                              f"checkpoint to fine-tune "
                              f"(a train.py .pt, a llama2.c .bin or a Hugging Face directory)")
    if c["init_checkpoint"] is not None and c["init_from"] != "auto":
        raise ConfigError(f"init_checkpoint={c['init_checkpoint']!r} is for init_from='auto'; to fine-tune, "
                          f"pass --init_from={c['init_checkpoint']}")
    if c["init_from"] == "auto":  # the same command continues the run once it has a checkpoint
        has_checkpoint = resume_path(c) is not None
        c["init_from"] = "resume" if has_checkpoint else c["init_checkpoint"] or "scratch"
        c["overwrite"] = c["overwrite"] or not has_checkpoint  # what an attempt that died early left
    at_least_one = ("threads", "batch_size", "max_seq_len", "gradient_accumulation_steps", "eval_interval",
                    "log_interval", "checkpoint_interval", "eval_iters", "vocab_size", "dim", "n_layers",
                    "n_heads", "n_kv_heads", "hidden_dim", "multiple_of")
    for key in at_least_one:
        if c[key] is not None and c[key] < 1:
            raise ConfigError(f"{named(key)} must be at least 1")
    c["device"] = runtime.resolve_device(c["device"])
    c["dtype"] = runtime.resolve_dtype(c["dtype"], c["device"])
    if c["compile"] and c["device"] == "cpu":
        if source.get("compile", COMMAND_LINE) == COMMAND_LINE:
            print0("note: compile=True on a CPU: the first step waits for compiling, which takes minutes for "
                   "the larger models, for little or no gain in step time (bench/README.md)")
        else:  # the configs are GPU recipes
            print0(f"note: {named('compile')} is off on a CPU, where compiling takes minutes for little or "
                   f"no gain in step time (bench/README.md); --compile=True compiles anyway")
            c["compile"] = False
    if c["log_interval"] is None:
        c["log_interval"] = 1 if c["device"] == "cpu" else 10
    if c["checkpoint_interval"] is None:
        c["checkpoint_interval"] = c["eval_interval"]
    for key in ("max_iters", "warmup_iters", "num_workers", "keep_checkpoints"):
        if c[key] < 0:
            raise ConfigError(f"{named(key)} must not be negative")
    for key in ("learning_rate", "muon_lr", "norm_eps", "rope_theta"):
        if c[key] <= 0:
            raise ConfigError(f"{named(key)} must be positive")
    for key in ("weight_decay", "muon_weight_decay"):
        if c[key] < 0:
            raise ConfigError(f"{named(key)} must not be negative")
    for key in ("dropout", "muon_momentum"):
        if not 0 <= c[key] < 1:
            raise ConfigError(f"{named(key)} must be in [0, 1)")
    if not 0 <= c["decay_frac"] <= 1:
        raise ConfigError(f"{named('decay_frac')} must be in [0, 1]: the share of the run that decays")
    lora.check_settings(c)
    if c["auto_batch_size"] and c["max_batch_size"]:
        raise ConfigError("--batch_size=auto keeps the tokens per iteration and --batch_size=max grows them: "
                          "give one of them")
    if c["lora_rank"] and c["optimizer"] == "muon":
        raise ConfigError(f"{named('optimizer')} with {named('lora_rank')}: LoRA's adapters train with "
                          f"AdamW; pass --optimizer=adamw")

    if c["min_lr"] is None:
        c["min_lr"] = c["learning_rate"] / 10
    if c["decay_lr"] and c["min_lr"] > c["learning_rate"]:
        raise ConfigError(f"{named('min_lr')} is above {named('learning_rate')}: the learning rate would "
                          f"climb as it decays; lower --min_lr (or leave it out: learning_rate / 10)")
    if c["decay_lr"] and c["lr_decay_iters"] is not None and c["lr_decay_iters"] < c["warmup_iters"]:
        raise ConfigError(f"{named('lr_decay_iters')} is shorter than {named('warmup_iters')}; "
                          f"lower --warmup_iters or raise --lr_decay_iters")
    length = _run_length(c, source)
    for key in ("max_tokens", "max_epochs"):
        if key != length:
            c[key] = None  # (max_iters is derived from the budget in settle_run_length)
        elif c[key] <= 0:
            raise ConfigError(f"{named(key)} must be positive")
    try:
        ModelArgs.from_dict(c)  # invalid shapes fail here, before any data is read
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return c


def settle_run_length(c: dict, tokens_per_epoch: int, iter_num: int = 0, tokens_seen: int = 0) -> dict:
    """max_iters from max_tokens or max_epochs when one of them sets the run's length (the iterations that
    reach it from where a resumed run stands), then lr_decay_iters (None: max_iters)."""
    c = dict(c)
    budget = next((k for k in ("max_tokens", "max_epochs") if c[k] is not None), None)
    if budget:
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
    # so is a cosine that ends before the run at min_lr=0, when it is asked for; but never in silence
    elif c["decay_lr"] and c["min_lr"] == 0 and c["lr_decay_iters"] < c["max_iters"]:
        print0(f"warning: lr_decay_iters={c['lr_decay_iters']} ends before max_iters={c['max_iters']} with "
               f"min_lr=0: the last {c['max_iters'] - c['lr_decay_iters']} iterations train at a learning "
               f"rate of 0; pass --lr_decay_iters={c['max_iters']} or a --min_lr above 0")


def _read_settings(path: str) -> dict | None:
    # a checkpoint's settings and iteration, without reading its tensors (mapped, not loaded); None when it
    # cannot be read, which train.py's read_checkpoint then reports in full
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        return {"config": checkpoint["config"], "as_given": checkpoint.get("as_given", {}),
                "iter_num": checkpoint["iter_num"]}
    except Exception:  # whatever a damaged file raises
        return None


def for_resume(config: Config, path: str) -> Config:
    """The settings a resumed run continues with: its checkpoint's, in place of the defaults and the config
    file's; only the command line changes them. Each difference is named in a note."""
    if not os.path.exists(path):
        if previous := runs.previous_run(config["out_dir"]):
            raise ConfigError(f"init_from='resume' but {no_checkpoint_yet(config['out_dir'], previous)}")
        raise ConfigError(f"init_from='resume' but there is no checkpoint at {path}; "
                          f"train from scratch first, or point --out_dir at the run to continue")
    if (read := _read_settings(path)) is None:
        return config
    # the settings as given (min_lr None is learning_rate / 10 whatever the rate), except lr_decay_iters: the
    # cosine ends where it ended, so that a longer run does not send the learning rate back up
    saved = read["config"] | {k: v for k, v in read["as_given"].items() if k != "lr_decay_iters"}
    saved = {"optimizer": "adamw", "lr_schedule": "cosine"} | saved  # (from before these settings)
    c = Config(config, config.source, config.notes)
    typed = {k for k, w in config.source.items() if w == COMMAND_LINE}
    changed, kept, overruled, stretched = [], [], [], None

    def take(key):
        if key in typed:
            if saved[key] != config[key]:
                changed.append(f"{key} {saved[key]!r} -> {config[key]!r}")
            return
        c[key], c.source[key] = saved[key], CHECKPOINT
        if saved[key] != config[key] and config.source[key] == DEFAULT:
            kept.append(f"{key}={saved[key]!r}")
        elif saved[key] != config[key]:
            overruled.append(f"{key}={saved[key]!r} ({config.source[key]} says {config[key]!r})")

    for key in [k for k in config if k in saved and k not in THIS_PROCESS + RUN_LENGTH]:
        take(key)
    # the run's length: given again, it replaces the checkpoint's, whichever of the three each is
    length = next((k for k in ("max_tokens", "max_epochs") if saved.get(k) is not None), "max_iters")
    new_length = next((k for k in RUN_LENGTH if k in typed), None)
    if new_length is None:
        take(length)
        overruled += [f"{length}={saved[length]!r} ({config.source[k]} says {k}={config[k]!r})"
                      for k in RUN_LENGTH if k != length and config.source[k] not in (DEFAULT, COMMAND_LINE)]
    elif (new_length, config[new_length]) != (length, saved[length]):
        changed.append(f"{length} {saved[length]!r} -> {config[length]!r}" if new_length == length
                       else f"{length}={saved[length]!r} -> {new_length}={config[new_length]!r}")
        # a schedule that ends with the run at min_lr=0 follows it to its new end, or every added iteration
        # would train at a learning rate of 0
        if ("lr_decay_iters" not in typed and c["decay_lr"] and c["min_lr"] == 0
                and saved["lr_decay_iters"] == saved["max_iters"]):
            c["lr_decay_iters"], stretched = None, saved["max_iters"]

    # (a different vocab_size is left to check_vocabulary, which says which data the model needs)
    shape_keys = {f.name for f in fields(ModelArgs)} - set(NOT_SHAPE) - {"vocab_size"}
    shape_keys |= {"lora_rank", "lora_targets", "weight_init"}  # the adapters' shape; how the weights began
    shape = [k for k in sorted(shape_keys & typed & saved.keys()) if saved[k] != config[k]]
    if shape:
        differ = ", ".join(f"{k}={saved[k]!r} (command line: {config[k]!r})" for k in shape)
        raise ConfigError(f"{path} was trained with {differ}; a resumed run keeps the model's shape: "
                          "drop those settings, or start a new run")
    if "optimizer" in typed and config["optimizer"] != saved["optimizer"]:
        raise ConfigError(f"{path} was trained with optimizer={saved['optimizer']!r}, whose state a resumed "
                          f"run continues: pass --optimizer={saved['optimizer']}, or start a new run")
    iter_num, warmup = read["iter_num"], saved["warmup_iters"]
    if "warmup_iters" in typed and c["decay_lr"] and warmup <= iter_num < c["warmup_iters"]:
        raise ConfigError(f"warmup_iters={c['warmup_iters']} (command line) would warm up again: the run is "
                          f"at iteration {iter_num}, past its warmup of {warmup}; drop --warmup_iters")
    device = runtime.resolve_device(c["device"])
    try:
        runtime.resolve_dtype(c["dtype"], device)
    except ConfigError:  # a bf16 run resumed on a GPU without bf16
        if c.source["dtype"] == CHECKPOINT:
            c["dtype"] = "auto"
            kept = [k for k in kept if not k.startswith("dtype=")]
            overruled = [k for k in overruled if not k.startswith("dtype=")]
            changed.append(f"dtype {saved['dtype']!r} -> 'auto' (this device)")
    if kept:
        print0(f"note: continuing with the checkpoint's {', '.join(kept)} "
               f"(give a setting on the command line to change it)")
    if overruled:
        print0(f"note: kept the checkpoint's {', '.join(overruled)}: a resumed run changes only the settings "
               f"on the command line")
    if changed:
        print0(f"note: changed on resume: {', '.join(changed)}")
    if stretched:
        print0(f"note: the schedule decays to min_lr=0 at the run's end (iteration {stretched}): it follows "
               f"the run to its new end, so that no iteration trains at a learning rate of 0 "
               f"(--lr_decay_iters={stretched} with a --min_lr above 0 keeps the old end)")
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
    if "weight_init" in given:
        print0(f"note: weight_init={c['weight_init']!r} is for a run from scratch; the weights come from "
               f"{path}")
    return c


# batch_size=max tries micro-batches up to this many sequences: more than any GPU holds of the models here
# at their contexts (the 15M model takes 128 in 24 GB), and the bound keeps the search short
MAX_BATCH = 1024


def processes_on_this_machine(device: str) -> int:
    # what shares the memory a step needs: a GPU is each process's own, a CPU's RAM is the node's
    return 1 if device.startswith("cuda") else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def choose_batch_size(c: dict, args: ModelArgs, world_size: int, device: str) -> dict:
    # auto: the sequences per iteration stay, in the fewest micro-steps that fit; max: the micro-steps stay
    # and the micro-batch is the largest that fits, so the sequences per iteration grow with it
    mode, steps = "max" if c["max_batch_size"] else "auto", c["gradient_accumulation_steps"]
    sequences = c["batch_size"] * steps
    try:
        largest, how = largest_batch(args, MAX_BATCH if mode == "max" else sequences // world_size, device,
                                     c["dtype"], processes_on_this_machine(device), frozen=c["lora_rank"] > 0)
    except ValueError as e:
        raise ConfigError(f"batch_size={mode}: {e}") from None
    if world_size > 1:  # every process takes the same micro-batch: the one with the least memory decides
        smallest = torch.tensor(largest, device=device if device.startswith("cuda") else "cpu")
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        largest = int(smallest)
    if largest == 0:
        raise ConfigError(f"batch_size={mode}: not even one sequence of {args.max_seq_len} tokens fits "
                          f"({how}); use a shorter --max_seq_len or a smaller model")
    if mode == "max":
        cap = ", the most it tries" if largest == MAX_BATCH else ""
        print0(f"batch_size=max: {largest} x {steps} accumulation steps = {largest * steps} sequences per "
               f"iteration, {largest * steps * args.max_seq_len:,} tokens (in place of {c['batch_size']} x "
               f"{steps}; {how}{cap})")
        return {"batch_size": largest}
    batch, accum = split_batch(sequences, world_size, largest)
    print0(f"batch_size=auto: {batch} x {accum} accumulation steps = {sequences} sequences per iteration "
           f"(up to {largest} fit, {how}; "
           f"the micro-batch must divide the {sequences // world_size} per process)")
    return {"batch_size": batch, "gradient_accumulation_steps": accum}


def check_memory(c: dict, args: ModelArgs, device: str, world_size: int) -> None:
    # a step that cannot fit stops now, with a batch size that does, instead of minutes later (on a CPU,
    # killed by the kernel without a word)
    free, here = available_bytes(device), processes_on_this_machine(device)
    device_type = device.split(":")[0]
    frozen = c["lora_rank"] > 0
    need = step_bytes(args, c["batch_size"], c["dtype"], device_type, frozen) * here
    if free is None or need <= free:
        return
    share = 0.9 * free / here
    largest = largest_that_fits(
        lambda b: step_bytes(args, b, c["dtype"], device_type, frozen) <= share, c["batch_size"])
    where = f"{free / 2**30:.1f} GiB is available" + (f" to {here} processes" if here > 1 else "")
    what = (f"a training step of {c['batch_size']} x {args.max_seq_len} tokens needs about "
            f"{need / here / 2**30:.1f} GiB")
    if largest == 0:
        raise ConfigError(f"{what} even at batch_size=1 and {where}: "
                          f"use a shorter --max_seq_len or a smaller model")
    batch, accum = split_batch(c["batch_size"] * c["gradient_accumulation_steps"], world_size, largest)
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


# -----------------------------------------------------------------------------
# memory: how much a training step needs, and the largest micro-batch that fits

def step_bytes(args: ModelArgs, batch_size: int, dtype: str, device_type: str, frozen: bool = False) -> int:
    """An estimate of the peak memory of one training step (forward, backward, AdamW) in bytes; within
    about a third of what PyTorch allocates, usually below it. frozen: the weights do not train (LoRA)."""
    params = args.num_params()
    half = dtype in ("bfloat16", "float16")
    # float32 weights, and unless frozen their gradients and AdamW's two moments; under autocast, the
    # half-precision weight copies
    weights = (4 if frozen else 16) * params + (2 * params if half else 0)
    tokens = batch_size * args.max_seq_len
    kv_dim = args.n_kv_heads * (args.dim // args.n_heads)
    # what each layer keeps for the backward pass, per token: the norms' inputs and outputs, q k v before
    # and after RoPE, the attention output, and the feed-forward's four hidden-size tensors. Autocast does
    # not halve it: the residual stream and the norms stay float32 beside the half-precision copies.
    per_token_layer = 9 * args.dim + 5 * kv_dim + 4 * args.hidden_dim
    activations = tokens * args.n_layers * per_token_layer * 4
    # the (B, T, vocab) logits: themselves and the log-probabilities, then in the backward pass at once the
    # loss's dense gradient, the softmax's exp() and the logits' gradient (20 bytes a logit in float32)
    logits = tokens * args.vocab_size * (12 if half else 20)
    attention = 0
    if device_type == "cpu" and args.dropout > 0:  # the CPU path with dropout keeps its attention weights
        # (the weights before and after dropout, and its mask: about 10 bytes per score)
        attention = args.n_layers * batch_size * args.n_heads * args.max_seq_len ** 2 * 10
    return weights + activations + logits + attention


def available_bytes(device: str) -> int | None:
    """Memory a step may use now: the GPU's free memory, or the host's available RAM (None: unknown)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    try:
        with open("/proc/meminfo", encoding="ascii") as f:  # Linux: what can be used without swapping
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def largest_that_fits(fits, limit: int) -> int:
    """The largest n in [1, limit] with fits(n), for fits true up to some n and false beyond: doubling
    from 1, then bisecting between the last size that fitted and the first that did not. 0: none fits."""
    if not fits(1):
        return 0
    good, bad = 1, None
    while bad is None and good < limit:
        n = min(2 * good, limit)
        good, bad = (n, None) if fits(n) else (good, n)
    if bad is None:
        return good
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def split_batch(sequences: int, world_size: int, largest: int) -> tuple[int, int]:
    """(batch_size, gradient_accumulation_steps) for `sequences` per iteration over world_size processes,
    with the micro-batch as large as possible but at most `largest`: it must divide sequences / world_size,
    so that every process takes the same number of micro-steps and the tokens per iteration stay the same."""
    per_process = sequences // world_size
    batch = max(b for b in range(1, max(1, min(largest, per_process)) + 1) if per_process % b == 0)
    return batch, sequences // batch


def step_fits(args: ModelArgs, batch_size: int, device: str, dtype: str) -> bool:
    """Runs a real step (forward, backward, AdamW) of batch_size sequences on the GPU: does it fit?"""
    model = optimizer = x = loss = None
    try:
        model = Transformer(args).to(device)
        optimizer = model.configure_optimizers(0.0, 1e-4, (0.9, 0.95), "cuda")
        x = torch.randint(args.vocab_size, (batch_size, args.max_seq_len + 1), device=device)
        context = (torch.autocast("cuda", dtype=getattr(torch, dtype)) if dtype != "float32"
                   else torch.enable_grad())
        with context:
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del model, optimizer, x, loss
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(args: ModelArgs, limit: int, device: str, dtype: str, processes_here: int = 1,
                  frozen: bool = False, headroom: float = 0.9) -> tuple[int, str]:
    """The largest micro-batch up to limit that fits (0: not even one), and how that was found. On a GPU,
    with real steps; on a CPU, from the estimate against the available memory, which processes_here
    processes of this machine share."""
    if device.startswith("cuda"):
        return largest_that_fits(lambda b: step_fits(args, b, device, dtype), limit), "measured on the GPU"
    free = available_bytes(device)
    if free is None:
        raise ValueError("it needs to know the free memory, which this system does not tell: "
                         "give --batch_size=N")
    share = headroom * free / processes_here
    fits = lambda b: step_bytes(args, b, dtype, device.split(":")[0], frozen) <= share
    return largest_that_fits(fits, limit), f"estimated against {free / 2**30:.1f} GiB of available memory"
