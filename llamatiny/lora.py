"""
LoRA (Hu et al., 2021): fine-tune a trained model by training a low-rank update beside each of its
weight matrices, leaving the weights themselves frozen:

    y = x W^T + (alpha / rank) * dropout(x) A^T B^T       W: (out, in), A: (rank, in), B: (out, rank)

B starts at zero, so step 0 is the base model; only A and B train, a few percent of the parameters, and
a checkpoint holds them (plus what identifies the base) instead of a second copy of the weights. Merged,
W + (alpha / rank) B A is an ordinary weight again: every export format and every reader takes it.

train.py --lora_rank=8 --init_from=PATH attaches the adapters (attach); checkpoint.from_checkpoint loads
a LoRA checkpoint's base, checks it against base_sha256 and adds the adapters; export.py merges them or
writes them alone in Hugging Face PEFT's layout. A base that its own run rewrites (out/15m/ckpt.pt, which
that run replaces at every checkpoint, resumed or not) is kept by the LoRA run as out_dir/base.pt, a hard
link to the bytes it trained on (kept_base); any other base (a published .bin, a Hugging Face directory) is
named where it is.
"""
import fnmatch
import hashlib
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from configurator import ConfigError
from model import Transformer

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # the matrices of attention and the feed-forward
ADAPTER_KEYS = (".lora_A", ".lora_B")  # how the adapters' state_dict names end


class LoRALinear(nn.Module):
    # Takes over a bias-free nn.Linear: its weight stays under the same name (so a state_dict holds the
    # base's keys unchanged, plus lora_A and lora_B) and stops taking gradients.
    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        assert linear.bias is None, "the model's linear layers have no bias"
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        like = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))  # zero: B A = 0 at step 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as the paper's code
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        # (B, T, in) -> (B, T, rank) -> (B, T, out); the scaling is applied where the tensor is smallest
        update = F.linear(F.linear(self.dropout(x), self.lora_A) * self.scaling, self.lora_B)
        return F.linear(x, self.weight) + update

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        update = self.lora_B.float() @ self.lora_A.float()  # (out, in), in float32
        return (self.weight.float() + self.scaling * update).to(self.weight.dtype)


def parse_targets(text: str) -> tuple[str, ...]:
    # "wq, wv" -> ("wq", "wv"), in TARGETS' order
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TARGETS]
    if unknown or not names:
        what = f"{unknown[0]!r} is not one of the weights" if unknown else "name at least one weight"
        raise ConfigError(f"lora_targets={text!r}: {what}; choose from {','.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)


def check_settings(c: dict) -> None:
    # train.py's lora_* settings; lora_rank 0 (the default) is a full fine-tune or training from scratch
    rank = c["lora_rank"]
    if rank < 0:
        raise ConfigError(f"lora_rank={rank!r} must be 0 (off) or the adapters' rank, e.g. 8")
    parse_targets(c["lora_targets"])
    if rank == 0:
        return
    if c["init_from"] == "scratch":
        raise ConfigError(f"lora_rank={rank} adapts a trained model: give it with --init_from=PATH (a .pt, "
                          "a llama2.c .bin or a Hugging Face directory), or --init_from=resume to continue a "
                          "LoRA run")
    if os.path.abspath(c["init_from"]) == os.path.abspath(os.path.join(c["out_dir"], "ckpt.pt")):
        raise ConfigError(f"init_from={c['init_from']!r} is the checkpoint this run writes: its adapters "
                          "would replace the base model they need; choose another --out_dir")
    if c["lora_alpha"] <= 0:
        raise ConfigError(f"lora_alpha={c['lora_alpha']} must be positive (the update is scaled by "
                          "alpha / rank)")
    if not 0 <= c["lora_dropout"] < 1:
        raise ConfigError(f"lora_dropout={c['lora_dropout']} must be in [0, 1)")


def attach(model: Transformer, rank: int, alpha: float, dropout: float = 0.0,
           targets: str = ",".join(TARGETS), adapters: dict | None = None) -> Transformer:
    """Freezes every parameter of model and puts a LoRALinear in place of each targeted nn.Linear (targets:
    "wq,wk,..." as the lora_targets setting); adapters (adapter_state of a trained one) restores trained
    values. Changes model in place and returns it."""
    wanted = parse_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    found = set()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in wanted and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
                found.add(name)
    if missing := [t for t in wanted if t not in found]:
        raise ValueError(f"the model has no linear layer named {missing[0]!r} to adapt")
    if adapters is not None:
        own = adapter_state(model)
        if set(adapters) != set(own) or any(adapters[k].shape != own[k].shape for k in own):
            odd = sorted(set(adapters) ^ set(own)) or [k for k in own if adapters[k].shape != own[k].shape]
            raise ValueError(f"the adapters do not fit this model (rank {rank}, targets {targets}): {odd[0]}")
        with torch.no_grad():
            for key, value in adapters.items():
                own[key].copy_(value)
    return model


def attach_for_training(model: Transformer, c: dict, resumed: dict | None, base_path: str) -> dict:
    """train.py's LoRA: attaches the adapters of settings c to model, which holds the base's weights: fresh
    ones (read from base_path), or those of resumed (a checkpoint read with from_checkpoint(merge=False)).
    Returns what identifies the base ({"path", "sha256"}), for the checkpoints."""
    if resumed is None:
        base, adapters = identify_base(base_path), None
    elif "lora" in resumed:
        base, adapters = resumed["lora"]["base"], resumed["lora"]["adapters"]
    else:
        raise ConfigError(f"lora_rank={c['lora_rank']}, but the checkpoint to resume trained every weight: "
                          "drop --lora_rank to continue it, or fine-tune it with --init_from=PATH in a new "
                          "out_dir")
    attach(model, c["lora_rank"], c["lora_alpha"], c["lora_dropout"], c["lora_targets"], adapters)
    return base


def lora_layers(model) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_state(model) -> dict:
    # {"layers.0.attention.wq.lora_A": (rank, in), "layers.0.attention.wq.lora_B": (out, rank), ...}
    return {k: v for k, v in model.state_dict().items() if k.endswith(ADAPTER_KEYS)}


def settings(model) -> dict:
    # the adapters' settings, read off the model: {"rank", "alpha", "dropout", "targets": "wq,wk,..."}
    layers = lora_layers(model)
    names = {name.rsplit(".", 1)[-1] for name, _ in layers}
    first = layers[0][1]
    return {"rank": first.rank, "alpha": first.alpha, "dropout": first.dropout.p,
            "targets": ",".join(t for t in TARGETS if t in names)}


def record(model, base: dict) -> dict:
    """What a checkpoint stores of a LoRA model: the adapters and their settings, and base ({"path",
    "sha256"} from identify_base), the model they were trained on. from_checkpoint reads it back."""
    return {**settings(model), "base": base, "adapters": adapter_state(model)}


def checkpoint_entries(model, base: dict | None) -> dict:
    # a checkpoint's weights: the whole state_dict, or for a LoRA model (base given) the adapters only
    return {"lora": record(model, base)} if base is not None else {"model": model.state_dict()}


def merge(model) -> Transformer:
    """A plain Transformer (a new one) whose weights are W + (alpha / rank) B A: the same function as model,
    computed as fast as the base model."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(ADAPTER_KEYS)}
    for name, layer in lora_layers(model):
        state[f"{name}.weight"] = layer.merged_weight()
    plain = Transformer(model.args).to(model.tok_embeddings.weight.device)
    plain.load_state_dict(state)
    return plain


def base_sha256(path) -> str:
    # what identifies a base model: the bytes of its file (of a Hugging Face directory: its weights and
    # config.json), so that adapters are never silently loaded onto other weights
    files = [os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")] \
        if os.path.isdir(path) else [path]
    digest = hashlib.sha256()
    for name in files:
        with open(name, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def identify_base(path) -> dict:
    return {"path": os.path.abspath(path), "sha256": base_sha256(path)}


def kept_base(path, out_dir) -> str | None:
    """Where a LoRA run in out_dir keeps its base path, out_dir/base.pt, when the base is a checkpoint that
    training rewrites: a ckpt*.pt in a run folder (one with config.json or metrics.jsonl). None for a base
    nothing rewrites."""
    folder = os.path.dirname(os.path.abspath(path))
    if not (os.path.isfile(path) and fnmatch.fnmatch(os.path.basename(path), "ckpt*.pt")
            and any(os.path.exists(os.path.join(folder, name)) for name in ("config.json", "metrics.jsonl"))):
        return None
    return os.path.abspath(os.path.join(out_dir, "base.pt"))


def summary(model) -> str:
    # the log's line: how many parameters train, and what share of the base model that is
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for name, p in model.named_parameters() if not name.endswith(ADAPTER_KEYS))
    s = settings(model)
    return (f"LoRA: {trained:,} parameters train, {100 * trained / base:.2f}% of the model's {base:,} "
            f"(frozen); rank {s['rank']}, alpha {s['alpha']:g}, dropout {s['dropout']:g}, on {s['targets']} "
            f"({len(lora_layers(model))} matrices)")
