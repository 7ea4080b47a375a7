r"""
Trains a small Llama on TinyStories (or your own data): on a CPU, one GPU, or several under torchrun.

    python train.py config/train_cpu_debug.py                      # a tiny model, about a minute on a CPU
    python train.py config/train_15m.py --batch_size=64            # a config file, then --key=value overrides
    python train.py config/train_15m.py --init_from=resume         # continue out_dir/ckpt.pt exactly
    python train.py config/train_15m.py --init_from=stories15M.bin --out_dir=out/ft \
        --optimizer=adamw --learning_rate=1e-4                     # fine-tune with AdamW
    python train.py config/train_15m.py --init_from=stories15M.bin --out_dir=out/lora \
        --optimizer=adamw --lora_rank=8                            # LoRA
    torchrun --standalone --nproc_per_node=4 train.py config/train_110m.py
    python train.py --help                                         # every setting, its default, what it is

Several nodes (the data on each; out_dir on a shared filesystem so that every node can resume):

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \
             train.py CONFIG
    torchrun --nnodes=2 --node_rank=1 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \
             train.py CONFIG
    (without InfiniBand, prefix NCCL_IB_DISABLE=1)

--init_from=PATH fine-tunes a trained model: one of our .pt checkpoints, a llama2.c model file or a Hugging
Face directory (llama2.c's published stories15M/42M/110M.bin need data in the Llama 2 vocabulary). Its
weights and shape are used (a note lists where the config differs); the optimizer, data and iteration
count start afresh. With --lora_rank=8 only low-rank adapters beside the frozen weights train
(llamatiny/lora.py), and the checkpoint holds them and names the base. --init_from=resume continues
out_dir/ckpt.pt with the settings it was trained with, in place of the defaults and the config file's: only
a setting on the command line replaces the checkpoint's, with a note.

The settings are the plain Python names below; configurator.py explains the override rules.
gradient_accumulation_steps is the global count: each of N processes does 1/N of it, so the
tokens per iteration do not depend on the number of GPUs. Every run writes out_dir/config.json,
out_dir/metrics.jsonl (one JSON object per log line and per eval) and out_dir/ckpt.pt (llamatiny/runs.py).
"""
import filecmp
import gc
import inspect
import math
import os
import shlex
import sys
import textwrap
import time
import typing
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import Config, ConfigError, as_config, commented_settings, format_config, parse_config
from llamatiny import cpu_kernels, data, fileio, lora, runs, runtime, settings
from llamatiny.checkpoint import (
    CheckpointError,
    check_runc,
    from_checkpoint,
    save_checkpoint,
    write_llama2c,
    write_tokenizer_bin,
)
from llamatiny.runtime import print0
from model import ModelArgs, Transformer, load_optimizer_state

# -----------------------------------------------------------------------------
# defaults: the 15M model of llama2.c (config/train_15m.py sets them explicitly)
# I/O
out_dir = "out"  # the run's folder: config.json, metrics.jsonl, the checkpoints
data_dir = "data"  # where tinystories.py put the data
dataset = "tinystories"  # or the NAME of `python tinystories.py prepare --name NAME`
instruction_tuning = False  # True (config/sft_*.py): the dataset must be instruction data, with loss masks
eval_interval = 2000  # iterations between evals; one that improves the val loss also writes ckpt_best.pt
# iterations per log line; None: 1 on a CPU, 10 on a GPU (each log line waits for it)
log_interval: int | None = None
eval_iters = 100  # batches per split per process at each eval
eval_only = False  # evaluate once (the checkpoint when resuming) and exit
# iterations between writes of out_dir/ckpt.pt (and one at the end); None: eval_interval
checkpoint_interval: int | None = None
keep_checkpoints = 0  # also keep the last N checkpoints as out_dir/ckpt_NNNNNN.pt
# llama2.c's habit: run.c's model.bin (llama2.c version 0, float32) beside each ckpt.pt, model_best.bin beside
# ckpt_best.pt, and tokenizer.bin at start (a LoRA run's with its adapters merged)
export_llama2c = False
# 'scratch'; 'resume': out_dir/ckpt.pt with its optimizer, data position and RNG, exactly where it stopped;
# a PATH to fine-tune (a train.py .pt, a llama2.c .bin, an HF directory): a fresh run from iteration 0;
# 'auto': 'resume' when out_dir/ckpt.pt exists, else init_checkpoint (or 'scratch'): relaunch the same command
init_from = "scratch"
init_checkpoint: str | None = None  # with init_from='auto': the model to fine-tune when there is no ckpt.pt
overwrite = False  # a new run may replace out_dir's run (kept until the new run's first checkpoint)
# LoRA (llamatiny/lora.py), with --init_from=PATH: the weights stay frozen, adapters beside them train
lora_rank = 0  # 0: off (every weight trains); e.g. 8: the adapters' rank
lora_alpha = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = ",".join(lora.TARGETS)  # the weights that get adapters: wq,wk,wv,wo (attention), w1,w2,w3
# wandb logging (pip install wandb)
wandb_log = False  # also log to Weights & Biases
wandb_project = "llama-tiny"  # the wandb project
wandb_run_name: str | None = None  # None: the out_dir's name
# data
batch_size = 128  # micro-batch size per process
# the largest micro-batch that fits (measured on a GPU, estimated on a CPU), keeping batch_size x
# gradient_accumulation_steps sequences per iteration; --batch_size=auto on the command line sets it
auto_batch_size = False
# the largest micro-batch that fits (found as for auto_batch_size) with gradient_accumulation_steps kept, so
# that the tokens per iteration grow with it; --batch_size=max on the command line sets it
max_batch_size = False
vocab_source = "llama2"  # 'llama2' (32,000 tokens) or 'custom' (data_dir/tok{vocab_size}.model)
num_workers = 0  # data loader worker processes
# how a run from scratch draws its weights (model.INIT_SCHEMES): 'gpt2' normal(0, 0.02) with wo and w2 at
# 0.02/sqrt(2 n_layers) (llama2.c's, nanoGPT's); 'hf' normal(0, 0.02) everywhere (transformers' Llama);
# 'kaiming' normal(0, sqrt(2/fan_in)) (He et al.)
weight_init = "gpt2"  # 'gpt2', 'hf' or 'kaiming'; the norm gains start at 1 in each
gradient_accumulation_steps = 4  # global: split across processes under DDP
# optimizer: 'adamw' for every weight (llama2.c's), or 'muon': Muon for the blocks' matrices (wq wk wv wo,
# w1 w2 w3), AdamW at learning_rate for the embedding, the output matrix and the norms
optimizer = "adamw"  # 'adamw' or 'muon'
learning_rate = 5e-4  # AdamW's peak learning rate, after warmup
max_iters = 100000  # the run's length in optimizer steps, unless max_tokens or max_epochs sets it
max_tokens: int | None = None  # the run's length in tokens
max_epochs: float | None = None  # the run's length in passes over the training split
weight_decay = 1e-1  # AdamW's, on the matrices (not the norms)
beta1 = 0.9  # AdamW's decay of its gradient average
beta2 = 0.95  # AdamW's decay of its squared-gradient average
grad_clip = 1.0  # 0 disables clipping
muon_lr = 0.02  # Muon's peak learning rate
muon_momentum = 0.95  # Muon's momentum
muon_weight_decay = 0.0  # Muon's weight decay
# learning rate schedule: linear warmup, then 'cosine' decay to min_lr, or 'wsd' (warmup-stable-decay): the
# peak until the last decay_frac of lr_decay_iters, then a straight line to min_lr. A wsd run can be extended
# from any point before its decay (--init_from=resume --max_iters=N --lr_decay_iters=N). The schedule scales
# both optimizers' learning rates alike
lr_schedule = "cosine"  # 'cosine' or 'wsd'
decay_frac = 0.2  # wsd: the share of lr_decay_iters that decays
decay_lr = True  # False: constant learning rates
warmup_iters = 1000  # iterations of linear warmup from the peak / warmup_iters
lr_decay_iters: int | None = None  # None: max_iters
min_lr: float | None = None  # None: learning_rate / 10
# system
device = "auto"  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' (bfloat16, else float16 on CUDA; float32 elsewhere), 'float32', 'bfloat16', 'float16'
compile = False  # torch.compile the model (use it on a GPU)
cpu_speedups = True  # faster CPU kernels for the same math (llamatiny/cpu_kernels.py); False: plain PyTorch
threads: int | None = None  # CPU threads; None: all cores on an idle machine, half while other jobs run
seed = 1337  # of the initial weights, the batches and dropout
print_model = False  # print every weight's shape and size at start
peak_flops: float | str | None = None  # the GPU's peak FLOP/s for MFU, or its name ('H100'); None: looked up
# model: every field of ModelArgs (model.py) is a setting, with its default (the 15M model): dim, n_layers,
# n_heads, n_kv_heads, vocab_size, hidden_dim, multiple_of, norm_eps, max_seq_len, dropout, rope_theta,
# tie_embeddings (False: an output layer of its own, vocab_size x dim more weights)
# -----------------------------------------------------------------------------
_CONFIG_KEYS = [k for k, v in globals().items()
                if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))]

EVAL_SEED = 2_147_483_647  # eval batches come from their own fixed stream, never the first training batches

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


def settings_help(width: int = 110) -> str:
    # --help: each setting, its default and what it is, read from the comments beside the defaults above (or
    # above a setting that has none beside it) and beside ModelArgs' fields: the text lives in one place
    defaults = default_config()
    with open(__file__, encoding="utf-8") as f:
        ours = commented_settings(f.read(), defaults)
    model = commented_settings(inspect.getsource(ModelArgs), defaults)
    rows = [(above if beside else [], name, beside or " ".join(above)) for name, beside, above in ours]
    rows += [(["model: the fields of ModelArgs (model.py)"] if i == 0 else [], name, beside)
             for i, (name, beside, _) in enumerate(model)]
    shown = {name: f"  {name} = {defaults[name]!r}" for _, name, _ in rows}
    column = min(40, max(map(len, shown.values()))) + 2
    lines = ["settings, their defaults and what they are (a config file or --key=value sets them):"]
    for header, name, text in rows:
        lines += [line for line in header if line.strip("-")]  # section titles, not the rulers
        wrapped = textwrap.wrap(text, width - column) or [""]
        if len(shown[name]) + 2 > column:  # a long default: its description on the lines below
            lines.append(shown[name])
            lines += [" " * column + part for part in wrapped if part]
        else:
            lines.append(f"{shown[name]:<{column}}{wrapped[0]}".rstrip())
            lines += [" " * column + part for part in wrapped[1:]]
    return "\n".join(lines)


def parse_settings(argv: list[str]) -> dict:
    # --batch_size=auto: the batch_size it would replace (a config file's) sets the sequences per iteration;
    # --batch_size=max: gradient_accumulation_steps stays, the micro-batch grows to fill the memory
    words = {"--batch_size=auto": "--auto_batch_size=True", "--batch_size=max": "--max_batch_size=True"}
    argv = [words.get(a, a) for a in argv]
    config = parse_config(default_config(), argv, setting_types(), settings.RENAMED, settings.IGNORED)
    return settings.shrunk_for_smoke_test(config)


def get_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float,
           schedule: str = "cosine", decay_frac: float = 0.2) -> float:
    # it counts optimizer steps from 0; step 0 already gets learning_rate / warmup_iters, never 0
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    if it >= lr_decay_iters:
        return min_lr
    if schedule == "wsd":
        decay_start = max(warmup_iters, lr_decay_iters - round(decay_frac * lr_decay_iters))
        if it < decay_start:
            return learning_rate
        return learning_rate - (it - decay_start) / (lr_decay_iters - decay_start) * (learning_rate - min_lr)
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def make_optimizer(model: Transformer, c: dict, device_type: str):
    muon = {"lr": c["muon_lr"], "momentum": c["muon_momentum"], "weight_decay": c["muon_weight_decay"]} \
        if c["optimizer"] == "muon" else None
    return model.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]),
                                      device_type, muon)


def parameter_table(model: Transformer) -> str:
    # --print_model: every weight, its shape and size; a tied output matrix is the embedding, counted once
    dims = lambda p: "x".join(map(str, p.shape))
    rows = [(name, dims(p), f"{p.numel():,}") for name, p in model.named_parameters()]
    if model.args.tie_embeddings:  # named_parameters() yields the shared matrix once, as the embedding
        rows.append(("output.weight", dims(model.output.weight), "tied"))
    rows.append(("total", "", f"{model.num_params():,}"))
    width = max(len(name) for name, _, _ in rows)
    lines = [f"  {name:<{width}}  {shape:>12}  {n:>12}" for name, shape, n in rows]
    return "\n".join(["parameters:"] + lines)


def read_checkpoint(path: str, device: str, merge_lora: bool = True) -> dict:
    # (a missing file was reported by resolve_config or settings.for_resume)
    try:
        return from_checkpoint(path, device, merge=merge_lora)[1]
    except (ValueError, OSError) as e:  # not a checkpoint, or a truncated one: the loader's message names the
        raise TrainError(str(e)) from None  # file and the newest good checkpoint beside it


def check_vocabulary(checkpoint: dict, path: str, meta: dict, shard_dir) -> None:
    # weights made for another vocabulary would train on tokens that mean something else, without any error
    n, trained = checkpoint["model_args"]["vocab_size"], checkpoint.get("config")
    if trained:  # train.py's checkpoints record the data they were trained on
        hint = (f"it was trained with --dataset={trained['dataset']} "
                f"--vocab_source={trained['vocab_source']} --vocab_size={trained['vocab_size']}")
    elif n == 32000:
        hint = ("llama2.c's stories15M/42M/110M.bin need data in the Llama 2 vocabulary: "
                "--vocab_source=llama2 --vocab_size=32000 (made by python tinystories.py pretokenize)")
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
            raise TrainError(f"{path} was trained with the tokenizer {saved} but the data in {shard_dir} "
                             f"was made with {current}: the same vocabulary size, different tokens; {hint}")


def open_dataset(c: dict):
    # the shard directory's meta.json says which tokenizer made it
    shard_dir = data.dataset_dir(c["data_dir"], c["dataset"], c["vocab_source"], c["vocab_size"])
    meta = data.read_meta(shard_dir)
    if settings.smoke_test():  # a smoke test checks the commands, on whatever data they find
        c["vocab_size"] = meta["vocab_size"]
    if meta["vocab_size"] != c["vocab_size"]:
        raise ConfigError(f"the data in {shard_dir} was tokenized with a {meta['vocab_size']}-token "
                          f"vocabulary but vocab_size={c['vocab_size']}; "
                          f"set --vocab_size={meta['vocab_size']} or re-tokenize")
    if c["instruction_tuning"] and "instruction" not in meta:
        raise ConfigError(f"instruction_tuning=True but {shard_dir} holds plain text (no loss masks): "
                          "prepare instruction data (`python tinystories.py prepare --input FILE --name "
                          "NAME --words_from_story 3` makes it of plain stories) or set "
                          "instruction_tuning=False")
    return shard_dir, meta


def setup_distributed(c: dict):
    # torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; returns (ddp, rank, world_size, device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False, 0, 1, c["device"]
    rank, world_size, device = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), c["device"]
    store, restart = None, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun restarted the workers (--max-restarts) and they share its store: the dead attempt's
        # addresses are still there, and connecting to them fails. Each attempt gets keys of its own.
        agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=False)
        store = dist.PrefixStore(f"llama-tiny/attempt-{restart}", agent)
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per process on each node
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=torch.device(device), store=store, rank=rank,
                                world_size=world_size)
    else:
        dist.init_process_group(backend="gloo", store=store, rank=rank, world_size=world_size)
    return True, rank, world_size, device


# -----------------------------------------------------------------------------
# setup: the run's settings, data, model, optimizer and where it starts

@dataclass
class Run:
    """One training run: its settings and processes, the pieces setup() makes for the loop, and where the
    loop stands (iter_num onwards), which each checkpoint records."""
    c: dict  # the settings, resolved: a resumed run's from its checkpoint, a fine-tune's shape from its model
    ddp: bool
    rank: int
    world_size: int
    device: str
    as_given: dict  # what resolution fills in, as given (settings.AS_GIVEN): a resume derives it again
    shard_dir: os.PathLike | None = None
    meta: dict | None = None  # the shards' meta.json: their tokenizer, and the template of instruction data
    loader: data.BatchLoader | None = None  # training batches: this process's share
    eval_loaders: dict | None = None  # {split: BatchLoader}, on a fixed seed of their own
    accum_steps: int = 1  # micro-steps per iteration in this process
    tokens_per_iter: int = 0  # of all processes
    peak: float | None = None  # the GPU's peak FLOP/s for MFU
    ctx: AbstractContextManager | None = None  # autocast in the run's dtype
    raw_model: Transformer | None = None  # the plain model, saved as it is (no compile or DDP prefixes)
    model: torch.nn.Module | None = None  # raw_model, compiled when asked: what evaluate() runs
    train_model: torch.nn.Module | None = None  # model, in DDP with several processes: what the loop trains
    lora_base: dict | None = None  # LoRA: the base model's path and hash; the adapters are on raw_model
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    previous: str | None = None  # the run this one replaces (overwrite), kept until the first checkpoint
    progress: runs.Progress | None = None
    wandb: runs.WandbLogger | None = None
    rng_to_restore: dict | None = None  # a resumed process's random streams, set just before the first step
    iter_num: int = 0
    tokens_seen: int = 0
    best_val_loss: float = float("inf")
    last_saved: int | None = None  # the iteration of the newest ckpt.pt; None while there is none

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.c["out_dir"], "ckpt.pt")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.c["out_dir"], "metrics.jsonl")


def setup(c: dict, config: Config, ddp: bool, rank: int, world_size: int, device: str) -> Run:
    # c: the resolved settings; config: the same as given, with where each came from
    r = Run(c, ddp, rank, world_size, device, as_given=settings.as_given(config))
    # the settings: a resumed run's come from its checkpoint (train()); a fine-tune takes the model's shape
    resume = c["init_from"] == "resume"
    r.previous = None if resume or c["eval_only"] else runs.previous_run(c["out_dir"])
    if r.previous and not c["overwrite"]:  # checked on every rank, before any time is spent
        if not os.path.exists(r.ckpt_path):
            raise ConfigError(settings.no_checkpoint_yet(c["out_dir"], r.previous))
        raise ConfigError(f"{c['out_dir']} already holds a run ({r.previous}): --init_from=resume continues "
                          f"it, --overwrite=True replaces it, or pass another --out_dir")
    if not c["eval_only"]:  # a folder that cannot be written (read-only, no permission) is refused now
        on_master(r, fileio.check_writable, c["out_dir"], then="pass another --out_dir")
    checkpoint = None
    if resume:
        checkpoint = read_checkpoint(r.ckpt_path, device, merge_lora=False)  # a LoRA run's base and adapters
    shard_dir, meta = open_dataset(c)
    if c["init_from"] != "scratch":
        init_path = r.ckpt_path if resume else c["init_from"]
        if c["lora_rank"] and not resume and not c["eval_only"]:
            # adapters need the very bytes of their base, which a base's own run replaces at its checkpoints
            if kept := lora.kept_base(init_path, c["out_dir"]):
                on_master(r, fileio.link_or_copy, init_path, kept)
                print0(f"note: {init_path} is rewritten by its run: this run keeps its base as {kept}")
                init_path = kept
        checkpoint = checkpoint or read_checkpoint(init_path, device)
        check_vocabulary(checkpoint, init_path, meta, shard_dir)
        if not resume:
            c = settings.for_finetune(c, checkpoint["model_args"], init_path, config.given)
    args = ModelArgs.from_dict(c)
    if c["export_llama2c"]:
        try:
            check_runc(args)  # now, not at the first checkpoint
        except CheckpointError as e:
            raise ConfigError(f"export_llama2c=True: {e}") from None
    if c["auto_batch_size"] or c["max_batch_size"]:
        c.update(settings.choose_batch_size(c, args, world_size, device))
    if not c["eval_only"]:
        settings.check_memory(c, args, device, world_size)
    shards = data.Shards(shard_dir, c["vocab_size"])  # read once, for the three loaders
    loader = data.BatchLoader(shards, "train", c["batch_size"], c["max_seq_len"], c["seed"], rank=rank,
                              world_size=world_size, device=device, num_workers=c["num_workers"])
    eval_loaders = {split: data.BatchLoader(shards, split, c["batch_size"], c["max_seq_len"], EVAL_SEED,
                                            rank=rank, world_size=world_size, device=device)
                    for split in ("train", "val")}
    start = (checkpoint["iter_num"], checkpoint["tokens_seen"]) if resume else (0, 0)
    c = settings.settle_run_length(c, loader.tokens_per_epoch, *start)
    settings.warn_about_the_schedule(c)
    r.c, r.shard_dir, r.meta, r.loader, r.eval_loaders = c, shard_dir, meta, loader, eval_loaders
    r.accum_steps = settings.split_accumulation(c["gradient_accumulation_steps"], world_size)  # per process
    r.tokens_per_iter = c["gradient_accumulation_steps"] * c["batch_size"] * c["max_seq_len"]  # global
    r.peak = settings.resolve_peak_flops(c["peak_flops"], r.device_type)
    r.ctx = runtime.autocast(device, c["dtype"])
    if r.device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls

    # the model and the optimizer, restored from the checkpoint when resuming
    runtime.seed_everything(c["seed"] + rank)  # DDP copies rank 0's initial weights to the others
    r.raw_model = raw_model = Transformer(args, init=c["weight_init"]).to(device)
    if c["cpu_speedups"] and r.device_type == "cpu":
        cpu_kernels.attach(raw_model)  # faster kernels for the same math
    if checkpoint is not None:
        raw_model.load_state_dict(checkpoint["model"])  # a resumed LoRA run: its base's weights
    if c["lora_rank"]:
        r.lora_base = lora.attach_for_training(raw_model, c, checkpoint if resume else None, init_path)
    r.optimizer = make_optimizer(raw_model, c, r.device_type)
    # a no-op unless float16: it scales the loss so small gradients do not underflow
    r.scaler = torch.amp.GradScaler(r.device_type, enabled=c["dtype"] == "float16")
    r.progress = runs.Progress(c["eval_interval"])
    if resume:
        restore(r, checkpoint)

    # torch.compile and DDP wrap the model; raw_model keeps the plain one for saving (no prefixes)
    r.model = torch.compile(raw_model) if c["compile"] else raw_model
    device_ids = [torch.device(device).index] if r.device_type == "cuda" else None
    r.train_model = DDP(r.model, device_ids=device_ids) if ddp else r.model

    print0("config:\n" + format_config(c))
    if not c["eval_only"]:  # an eval-only run leaves out_dir as it is
        on_master(r, start_run_folder, r, resume)
    describe(r)
    r.wandb = runs.WandbLogger(c, c["out_dir"], resume, say=print0) \
        if c["wandb_log"] and r.master and not c["eval_only"] else None
    return r


def restore(r: Run, checkpoint: dict) -> None:
    # a resumed run continues exactly: the position, the optimizer, the scaler, the data and random streams
    r.iter_num, r.tokens_seen = checkpoint["iter_num"], checkpoint["tokens_seen"]
    r.progress.elapsed_before = checkpoint.get("elapsed_s", 0.0)
    r.best_val_loss, r.last_saved = checkpoint["best_val_loss"], r.iter_num
    load_optimizer_state(r.optimizer, checkpoint["optimizer"])
    if r.scaler.is_enabled() and checkpoint["scaler"]:  # a bf16 or float32 run saved an empty state
        r.scaler.load_state_dict(checkpoint["scaler"])
    # every rank has taken the same number of batches, so rank 0's loader state places them all
    # (the loader also converts it when the number of processes or the batch shape changed)
    r.loader.load_state_dict(checkpoint["loader_state"])
    rng_states = checkpoint["rng_state"]  # one per rank
    if len(rng_states) == r.world_size:
        r.rng_to_restore = rng_states[r.rank]
    else:
        print0(f"note: {r.ckpt_path} was saved by {len(rng_states)} process(es), "
               f"this run has {r.world_size}: the data continues where it was, "
               f"the random streams (dropout) are reseeded")
        torch.manual_seed(r.c["seed"] + r.rank + r.iter_num * 1000)  # fresh streams, still deterministic
    print0(f"resuming from iteration {r.iter_num:,} ({r.tokens_seen:,} tokens) of {r.ckpt_path}")


def start_run_folder(r: Run, resume: bool) -> None:
    c = r.c
    os.makedirs(c["out_dir"], exist_ok=True)
    if resume:
        runs.truncate_metrics(r.metrics_path, r.iter_num)
    elif r.previous:
        aside = runs.set_aside_previous_run(c["out_dir"])
        print0(f"note: replacing the run in {c['out_dir']}; its files wait in {aside} until this run's "
               f"first checkpoint")
    runs.write_run_info(c["out_dir"], c, r.as_given, r.world_size)
    if c["export_llama2c"]:
        tokenizer, model = (os.path.join(c["out_dir"], name) for name in ("tokenizer.bin", "model.bin"))
        write_tokenizer_bin(tokenizer, r.meta["tokenizer"])
        print0(f"export_llama2c: each ckpt.pt comes with {model} for llama2.c's run.c (ckpt_best.pt with "
               f"model_best.bin): ./run {shlex.quote(model)} -z {shlex.quote(tokenizer)}")


def describe(r: Run) -> None:
    # the start-up lines: the model, the data, the batch and the run's length
    c, raw_model, loader = r.c, r.raw_model, r.loader
    if c["print_model"]:
        print0(parameter_table(raw_model))
    params = raw_model.num_params()
    budget = r.tokens_seen + r.tokens_per_iter * (c["max_iters"] - r.iter_num)
    length = next((f" (set by {k}={c[k]})" for k in ("max_tokens", "max_epochs") if c[k] is not None), "")
    print0(f"model: {params:,} parameters ({raw_model.num_params(non_embedding=True):,} without the "
           f"embedding); data: {r.shard_dir} ({loader.tokens_per_epoch:,} training tokens per epoch)")
    if r.lora_base:
        print0(lora.summary(raw_model) + f"; base {r.lora_base['path']}")
    print0(f"tokens per iteration: {r.tokens_per_iter:,} = {r.world_size} process(es) x "
           f"{r.accum_steps} accumulation step(s) x {c['batch_size']} batch x {c['max_seq_len']} tokens")
    if loader.masked:
        packing = loader.packing()
        print0(f"instruction data: loss on {loader.loss_share:.0%} of tokens (the responses; "
               f"{r.meta['instruction']['template']['name']} template); each window holds whole records, "
               f"{packing['padding']:.1%} of window tokens are padding; {packing['cut']:,} of "
               f"{packing['records']:,} records are longer than a window ({c['max_seq_len'] + 1} tokens) and "
               f"cut to their start (the instruction kept)")
    threads = f" ({torch.get_num_threads()} CPU threads)" if r.device_type == "cpu" else ""
    smoke = f"; {settings.SMOKE_TEST}: a smoke test's tiny model and counts" if settings.smoke_test() else ""
    print0(f"run: {c['max_iters']:,} iterations{length} = {budget:,} tokens = "
           f"{budget / loader.tokens_per_epoch:.2f} epochs, {budget / params:.1f} tokens per parameter; "
           f"device {r.device}{threads}, {c['dtype']}" + (", compiled" if c["compile"] else "") + smoke)


# -----------------------------------------------------------------------------
# what the loop calls: files written on rank 0, evaluation, the metrics and the checkpoints

def on_master(r: Run, write, *args, then: str | None = None):
    # only rank 0 writes files. When a write fails there (a full disk, a quota, a read-only folder), every
    # rank stops here together, none left waiting in a collective, and rank 0 says why in one line
    error = result = None
    if r.master:
        try:
            result = write(*args)
        except OSError as e:
            error = e
    if r.ddp:
        failed = torch.tensor(int(error is not None), device=r.device)
        dist.broadcast(failed, src=0)
        if failed.item() and not r.master:
            raise SystemExit(1)
    if error is not None:
        raise TrainError(f"{error}: {then or after_a_failed_write(r, error)}")
    return result


def after_a_failed_write(r: Run, e: OSError) -> str:
    fix = "free space" if e.errno in fileio.NO_SPACE else f"make {r.c['out_dir']} writable"
    if r.last_saved is None:
        again = " with --overwrite=True" if runs.previous_run(r.c["out_dir"]) else ""
        return f"no checkpoint was written; {fix} and run the same command again{again}"
    try:  # metrics.jsonl ends where the checkpoint does, as resume continues from it
        runs.truncate_metrics(r.metrics_path, r.last_saved)
    except OSError:
        pass  # resume truncates it too
    return (f"the previous checkpoint {r.ckpt_path} (iteration {r.last_saved}) is intact; {fix} and resume "
            f"with --init_from=resume")


@torch.no_grad()
def evaluate(model, loaders: dict, eval_iters: int, world_size: int, device, ctx) -> dict:
    # loaders: {split: BatchLoader} with their own fixed seed, rewound each time: every eval sees the same
    # batches, so evals compare like with like
    model.eval()
    losses = {}
    for split, loader in loaders.items():
        loader.rewind()
        total = torch.zeros(2, device=device)  # the summed loss and the number of targets (masked: responses)
        for _ in range(eval_iters):
            x, y = loader.next_batch()
            with ctx:
                _, loss = model(x, y)
            counted = (y != -1).sum().float()
            total += torch.stack([torch.where(counted > 0, loss.float() * counted, 0.0), counted])
        if world_size > 1:
            dist.all_reduce(total)  # every rank evaluates its own batches; the mean is over all of them
        loss_sum, counted = total.tolist()
        losses[split] = loss_sum / max(counted, 1)
    model.train()
    return losses


def log(r: Run, record: dict) -> None:
    on_master(r, runs.append_jsonl, r.metrics_path, record)
    if r.wandb:
        r.wandb.log(record, step=r.iter_num)


def stop_non_finite(r: Run, what: str, value: float):
    kept = f"the last good checkpoint is {r.ckpt_path} (iteration {r.last_saved})" \
        if r.last_saved is not None else "no checkpoint was written"
    raise TrainError(f"{what} is {value} at iteration {r.iter_num}; training stopped and {kept}. "
                     f"Try a lower learning_rate, a grad_clip, or dtype=bfloat16/float32")


def write_checkpoints(r: Run, latest: bool, improved: bool) -> None:
    # ckpt.pt when latest, ckpt_best.pt when improved (and the numbered ones kept beside them)
    # the RNG streams of every rank (dropout differs per rank), so each continues exactly
    rng_states = [runs.get_rng_state()]
    if r.ddp:
        rng_states = [None] * r.world_size
        dist.all_gather_object(rng_states, runs.get_rng_state())  # every rank takes part
    state = None  # rank 0's
    if r.master:
        state = {**lora.checkpoint_entries(r.raw_model, r.lora_base),
                 "model_args": asdict(r.raw_model.args), "optimizer": r.optimizer.state_dict(),
                 "scaler": r.scaler.state_dict(), "config": r.c, "as_given": r.as_given,
                 "iter_num": r.iter_num, "tokens_seen": r.tokens_seen, "best_val_loss": r.best_val_loss,
                 "loader_state": r.loader.state_dict(unused=r.accum_steps), "rng_state": rng_states,
                 "tokenizer": r.meta["tokenizer"], "elapsed_s": r.progress.elapsed()}
        if "instruction" in r.meta:  # sample.py and eval.py prompt the model as it was trained
            state["template"] = r.meta["instruction"]["template"]
    written = on_master(r, runs.save_checkpoints, r.c["out_dir"], state, latest, improved,
                        r.c["keep_checkpoints"], save_checkpoint)
    if latest:
        r.last_saved = r.iter_num
    if r.c["export_llama2c"]:  # once the checkpoints are safe: a failure here loses none of them
        written = on_master(r, write_llama2c_files, r, written)
    if r.master:
        print0(f"saved {', '.join(os.path.basename(p) for p in written)} (iteration {r.iter_num})")
        if r.previous:
            runs.drop_previous_run(r.c["out_dir"])  # the new run has a checkpoint of its own now


def write_llama2c_files(r: Run, checkpoints: list[str]) -> list[str]:
    # export_llama2c: run.c's model file beside each checkpoint just written (ckpt.pt -> model.bin,
    # ckpt_best.pt -> model_best.bin, not the numbered ones), a LoRA run's adapters merged into its weights
    model = lora.merge(r.raw_model) if r.lora_base else r.raw_model
    names = {"ckpt.pt": "model.bin", "ckpt_best.pt": "model_best.bin"}
    bins = [os.path.join(r.c["out_dir"], names[os.path.basename(p)]) for p in checkpoints
            if os.path.basename(p) in names]
    for path in bins:
        write_llama2c(path, model)
    return checkpoints + bins


# -----------------------------------------------------------------------------
# the loop

def loop(r: Run) -> dict:
    """Trains from where setup() left the run to max_iters; returns the final figures."""
    c, loader, optimizer, scaler, progress = r.c, r.loader, r.optimizer, r.scaler, r.progress
    accum_steps, ddp, world_size, device = r.accum_steps, r.ddp, r.world_size, r.device
    if r.device_type == "cuda":  # the peak memory of training, not of batch_size=auto's trial steps
        torch.cuda.reset_peak_memory_stats(device)
    # a new run's starting point, as llama2.c and nanoGPT log it: about ln(vocab_size) from scratch, a
    # fine-tune's model on its new data (not timed as a step)
    if c["eval_only"] or c["init_from"] != "resume":
        eval_start = time.perf_counter()
        losses = evaluate(r.model, r.eval_loaders, c["eval_iters"], world_size, device, r.ctx)
        progress.not_timed(time.perf_counter() - eval_start, evaluation=True)
        print0(f"eval iter {r.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        uniform = math.log(c["vocab_size"])
        if c["init_from"] != "scratch" and losses["val"] > uniform:
            print0(f"warning: the model starts at val loss {losses['val']:.2f}, "
                   f"worse than guessing uniformly among its {c['vocab_size']:,} tokens "
                   f"(ln {c['vocab_size']:,} = {uniform:.2f}): "
                   f"the data was almost surely tokenized with another vocabulary than the model's")
        if c["eval_only"]:
            return {"iter_num": r.iter_num, **losses}
        log(r, {"iter": 0, "tokens": 0, "train_loss": losses["train"], "val_loss": losses["val"]})
    if r.iter_num >= c["max_iters"]:
        print0(f"nothing to do: the checkpoint is at iteration {r.iter_num} and max_iters={c['max_iters']}")
        return {"iter_num": r.iter_num}
    if r.rng_to_restore is not None:
        runs.set_rng_state(r.rng_to_restore)  # last, so that nothing above draws from the restored streams
    batches = [loader.next_batch() for _ in range(accum_steps)]  # an iteration's micro-batches, made ahead

    while r.iter_num < c["max_iters"]:
        lr = get_lr(r.iter_num, c["learning_rate"], c["warmup_iters"], c["lr_decay_iters"], c["min_lr"],
                    c["lr_schedule"], c["decay_frac"]) if c["decay_lr"] else c["learning_rate"]
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]  # Muon's matrices: muon_lr / learning_rate

        # The loss is the mean over the iteration's targets, all micro-batches of all ranks. Every target
        # counts in pretraining, the same number per micro-batch: each micro-batch's mean / accum_steps. With
        # instruction data only response tokens count, a different number per micro-batch: each mean is
        # weighted by its count n, times world_size / the total (DDP averages the gradients over ranks).
        if loader.masked:
            counts = [(y != -1).sum() for _, y in batches]
            total = torch.stack(counts).sum()
            if ddp:
                dist.all_reduce(total)  # a tensor op: the host does not wait for it
            weights = [n * world_size / total.clamp(min=1) for n in counts]
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(accum_steps):
            last = micro_step == accum_steps - 1
            x, y = batches[micro_step]
            # under DDP the gradients are all-reduced once, in the last micro-step's backward
            with nullcontext() if last or not ddp else r.train_model.no_sync():
                with r.ctx:
                    _, loss = r.train_model(x, y)
                    if loader.masked:  # (a micro-batch without a response has a NaN mean and weight 0)
                        loss = torch.where(weights[micro_step] > 0, loss * weights[micro_step], 0.0)
                    else:
                        loss = loss / accum_steps
                # the next iteration's micro-batch is made while the GPU works, before anything below waits
                batches[micro_step] = loader.next_batch()
                scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        scaler.unscale_(optimizer)  # clip and report the true gradients, not the fp16-scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(r.raw_model.parameters(),
                                                   c["grad_clip"] if c["grad_clip"] > 0 else float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        r.iter_num += 1
        r.tokens_seen += r.tokens_per_iter
        first = progress.first_step_s is None  # this process's first step gets a log line of its own
        if first and r.device_type == "cuda":
            torch.cuda.synchronize()  # once, so that the first step's time (compiling, warm-up) is real
        progress.step_done()

        if first or r.iter_num % c["log_interval"] == 0 or r.iter_num == c["max_iters"]:
            if ddp:
                dist.all_reduce(loss_sum)  # SUM (gloo has no AVG): the ranks' mean of the micro-step means
                loss_sum /= world_size  # (weighted by world_size / total with instruction data: the mean)
            lossf = loss_sum.item()  # waits for the GPU, so the time below is real
            dt = progress.window()  # None at the first step: compiling and warming up, not timed
            norm = grad_norm.item()
            if not math.isfinite(lossf):
                stop_non_finite(r, "the training loss", lossf)
            if not math.isfinite(norm) and not scaler.is_enabled():  # fp16's scaler skips such steps itself
                stop_non_finite(r, "the gradient norm", norm)
            tok_per_s = r.tokens_per_iter / dt if dt else None
            mfu = r.raw_model.estimate_mfu(r.tokens_per_iter // world_size, dt, r.peak) \
                if dt and r.peak else None
            if dt is None:
                speed = f"first step {progress.first_step_s:.1f} s" + (" (compiling)" if c["compile"] else "")
            else:
                speed = f"{dt * 1000:.1f} ms/iter | {tok_per_s:,.0f} tokens/s | " \
                        + (f"MFU {mfu * 100:.1f}%" if mfu is not None else "MFU -")
            # the peak of memory allocated since training began, what nvidia-smi's figure holds (with the
            # allocator's cache on top)
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if r.device_type == "cuda" else None
            if mem is not None:
                speed += f" | mem {mem:.2f} GiB"
            left = progress.left(r.iter_num, c["max_iters"])
            print0(f"iter {r.iter_num} | loss {lossf:.4f} | lr {lr:.2e} | grad norm {norm:.3f} | {speed} | "
                   f"{runs.format_duration(progress.elapsed())} elapsed"
                   + (f", {runs.format_duration(left)} left" if left is not None else ""))
            log(r, {"iter": r.iter_num, "tokens": r.tokens_seen, "loss": lossf, "lr": lr, "grad_norm": norm,
                    "dt_ms": (dt or progress.first_step_s) * 1000, "tok_per_s": tok_per_s, "mfu": mfu,
                    "elapsed_s": progress.elapsed(),
                    **({"first_step_s": progress.first_step_s} if first else {}),
                    **({"mem_gib": mem} if mem is not None else {})})

        # evals, and checkpoints: ckpt.pt every checkpoint_interval, ckpt_best.pt at a better val loss
        finished = r.iter_num == c["max_iters"]
        improved = False
        if r.iter_num % c["eval_interval"] == 0 or finished:
            eval_start = time.perf_counter()
            losses = evaluate(r.model, r.eval_loaders, c["eval_iters"], world_size, device, r.ctx)
            for split, value in losses.items():
                if not math.isfinite(value):
                    stop_non_finite(r, f"the {split} loss", value)
            print0(f"eval iter {r.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            log(r, {"iter": r.iter_num, "tokens": r.tokens_seen, "train_loss": losses["train"],
                    "val_loss": losses["val"]})
            improved = losses["val"] < r.best_val_loss
            r.best_val_loss = min(r.best_val_loss, losses["val"])
            progress.not_timed(time.perf_counter() - eval_start, evaluation=True)
        latest = r.iter_num % c["checkpoint_interval"] == 0 or finished
        if latest or improved:
            save_start = time.perf_counter()
            write_checkpoints(r, latest, improved)
            progress.not_timed(time.perf_counter() - save_start)

    print0(f"done: {r.iter_num:,} iterations, {r.tokens_seen:,} tokens in "
           f"{runs.format_duration(progress.elapsed())}, best val loss {r.best_val_loss:.4f}")
    return {"iter_num": r.iter_num, "best_val_loss": r.best_val_loss}


def train(config: dict) -> dict:
    """Runs training with config (train.py's settings, e.g. from parse_settings); returns the final figures.
    Its .source says where each setting came from; in a plain dict, those off their default count as typed."""
    if not isinstance(config, Config):
        config = as_config(config, default_config())
    if path := settings.resume_path(config):  # parsed -> the checkpoint's settings merged -> resolved
        config = settings.for_resume(config, path)
    c = settings.resolve_config(config)
    ddp, rank, world_size, device = setup_distributed(c)
    try:
        result = loop(setup(c, config, ddp, rank, world_size, device))
        if ddp:
            dist.barrier()  # no rank tears down its process group while another still talks to it
        return result
    finally:
        if ddp and dist.is_initialized():
            # DDP's reducer holds the process group; left to interpreter shutdown, gloo's threads can be
            # destroyed still running ("terminate called without an active exception", SIGABRT)
            gc.collect()
            dist.destroy_process_group()


def fail(message: str):
    # under torchrun every rank meets the same error: rank 0 says it in one line, the others exit quietly
    print0(message, file=sys.stderr)
    sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(settings_help())
        return
    config = None
    try:
        config = parse_settings(argv)
        # process-wide, like the allocator: here, not in train()
        threads = runtime.use_cpu_threads(config["threads"])
        if runtime.resolve_device(config["device"]) == "cpu":
            print0(f"using {threads}")
            if runtime.resolve_dtype(config["dtype"], "cpu") == "float32" and runtime.cpu_has_bf16():
                # faster on some such CPUs, slower on others (bench/README.md): a pointer, not a promise
                print0("this CPU has AVX512-BF16: --dtype=bfloat16 (autocast) may train faster than float32; "
                       "time a few steps of each")
            if config["cpu_speedups"]:
                cpu_kernels.keep_freed_memory()
        train(config)
    except (ConfigError, TrainError, data.DataError, OSError) as e:  # OSError: a file and the reason
        fail(f"error: {e}")
    except torch.cuda.OutOfMemoryError:
        b, a = config["batch_size"], config["gradient_accumulation_steps"]
        fail(f"error: CUDA out of memory with batch_size={b} (x {config['max_seq_len']} tokens per "
             f"micro-batch); try --batch_size={max(b // 2, 1)} --gradient_accumulation_steps={a * 2} "
             f"(the same tokens per iteration), or a shorter max_seq_len")
    except KeyboardInterrupt:
        fail("interrupted; the last checkpoint (if any) is intact: --init_from=resume continues from it")


if __name__ == "__main__":
    main()
