"""
The Llama model, in one file: RMSNorm, rotary embeddings, grouped-query attention through
PyTorch's scaled_dot_product_attention (flash kernels on CUDA), a SwiGLU feed-forward, token
embeddings tied to the output layer, and a preallocated KV cache for generation.

Weight names follow Meta's release (wq wk wv wo, w1 w2 w3), so the llama2.c and Hugging Face
exports in export.py map one to one. Read bottom-up: ModelArgs, RMSNorm, RoPE, Attention,
FeedForward, TransformerBlock, Transformer, then sampling and checkpoint loading.
"""
import inspect
import math
import os
import pickle
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    # defaults: the 15M TinyStories model
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None  # None: n_heads (plain multi-head attention)
    vocab_size: int = 32000
    hidden_dim: int | None = None  # None: llama2.c's rule, 2/3 of 4 * dim rounded up to multiple_of
    multiple_of: int = 32
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    dropout: float = 0.0
    rope_theta: float = 10000.0

    def __post_init__(self):
        # resolved here, so the checkpoint and every comparison see the real numbers
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim dim/n_heads = {self.dim}/{self.n_heads} = {self.dim // self.n_heads} "
                             "must be even for rotary embeddings")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        # picks the model's fields out of a larger dict (the training config, a checkpoint)
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # in float32 even under bf16/fp16 autocast: the mean of squares loses too much in half precision
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def precompute_rope(head_dim: int, max_seq_len: int, theta: float):
    # real cos/sin tables instead of complex numbers: complex buffers break torch.compile and NCCL
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (head_dim/2,)
    angles = torch.outer(torch.arange(max_seq_len).float(), freqs)  # (max_seq_len, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x: (B, T, n_heads, head_dim), rotating the interleaved pairs (x0, x1), (x2, x3), ... as Meta does
    # cos, sin: (T, head_dim/2)
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, head_dim/2, 2)
    x0, x1 = pairs.unbind(-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, T, H, head_dim/2, 2)
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.max_seq_len = args.max_seq_len
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)
        # KV cache for generation: (B, n_kv_heads, max_seq_len, head_dim), made by the first prefill
        self.cache_k = self.cache_v = None

    def forward(self, x, cos, sin, start_pos=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)

        if start_pos is None:  # training / full forward: causal attention over these T tokens
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # generation: write this chunk into the cache at start_pos, attend to all that came before
            if start_pos == 0 or self.cache_k is None or self.cache_k.shape[0] != B or self.cache_k.dtype != k.dtype:
                shape = (B, self.n_kv_heads, self.max_seq_len, self.head_dim)
                self.cache_k = torch.zeros(shape, dtype=k.dtype, device=k.device)
                self.cache_v = torch.zeros(shape, dtype=v.dtype, device=v.device)
            end = start_pos + T
            self.cache_k[:, :, start_pos:end] = k
            self.cache_v[:, :, start_pos:end] = v
            k, v = self.cache_k[:, :, :end], self.cache_v[:, :, :end]  # (B, n_kv_heads, end, head_dim)
            if T == 1:  # one new token sees every cached position: no mask needed
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            else:  # query i sits at position start_pos + i and sees keys 0 .. start_pos + i
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, dim)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down projection (residual output)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, start_pos=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, start_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied: one matrix, counted once

        cos, sin = precompute_rope(args.dim // args.n_heads, args.max_seq_len, args.rope_theta)
        # not persistent: derived from args, so checkpoints hold weights only
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

        self.apply(self._init_weights)
        # GPT-2's scaled init on the two projections that write into the residual stream
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens, targets=None, start_pos=None):
        # tokens: (B, T) int64; start_pos: None for training, else the cache position of tokens[:, 0]
        B, T = tokens.shape
        pos = 0 if start_pos is None else start_pos
        if pos + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds max_seq_len={self.args.max_seq_len}")
        h = self.dropout(self.tok_embeddings(tokens))  # (B, T, dim)
        cos, sin = self.freqs_cos[pos : pos + T], self.freqs_sin[pos : pos + T]
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos)
        h = self.norm(h)

        if targets is None:  # inference: only the last position's logits are needed
            return self.output(h[:, [-1], :]), None  # (B, 1, vocab_size)
        logits = self.output(h)  # (B, T, vocab_size)
        # reshape, not view: targets may be a slice such as tokens[:, 1:]
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() yields the tied matrix once
        return n - self.tok_embeddings.weight.numel() if non_embedding else n

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay matrices (embeddings and linear weights), not norms or biases
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # fused: one kernel for all parameters; on CPU too, where torch's default is a per-parameter
        # Python loop (15x slower on the 15M model: ~150 ms of a ~3.5 s step on 2 cores)
        fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self, seq_len: int | None = None) -> float:
        # 6N for the matmuls forward + backward, plus attention scores and values (PaLM appendix B)
        a = self.args
        T = seq_len or a.max_seq_len
        return 6 * self.num_params() + 12 * a.n_layers * a.n_heads * (a.dim // a.n_heads) * T

    def estimate_mfu(self, tokens_per_iter: int, dt: float, peak_flops: float = 312e12, seq_len=None) -> float:
        # model FLOPs utilisation: achieved FLOP/s over the device's peak (bf16 dense)
        return self.flops_per_token(seq_len) * tokens_per_iter / dt / peak_flops

    # ---------------------------------------------------------------- generation

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None):
        """Yields new tokens, (B,) each, using the KV cache; ends after max_new_tokens, or once
        every row has produced stop_token (which is not yielded)."""
        window = self.args.max_seq_len
        tokens = idx[:, -(window - 1):]  # a prompt longer than the context keeps its end
        logits, _ = self(tokens, start_pos=0)  # prefill
        pos = tokens.size(1)
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            next_token = sample_next(logits[:, -1, :], temperature, top_k, top_p)  # (B,)
            if stop_token is not None:
                done |= next_token == stop_token
                if done.all():
                    break
            yield next_token
            tokens = torch.cat((tokens, next_token[:, None]), dim=1)
            if pos == window:
                # context full: slide, keeping the latest half, and prefill it again at position 0
                tokens = tokens[:, -(window // 2):]
                logits, _ = self(tokens, start_pos=0)
                pos = tokens.size(1)
            else:
                logits, _ = self(next_token[:, None], start_pos=pos)
                pos += 1

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None):
        # idx: (B, T) -> (B, T + n); rows that stopped early are padded with stop_token
        new = []
        for token in self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, stop_token):
            if stop_token is not None and new:
                token = torch.where(new[-1] == stop_token, stop_token, token)
            new.append(token)
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)


def filter_logits(logits, top_k=None, top_p=None):
    # logits: (B, vocab_size); returns a copy with the excluded tokens at -inf
    logits = logits.clone()
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]  # (B, 1)
        logits[logits < kth] = -float("inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p; the most likely always stays
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
        logits[drop_sorted.scatter(-1, order, drop_sorted)] = -float("inf")
    return logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    # logits: (B, vocab_size) -> (B,) token ids; temperature 0 is greedy
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, num_samples=1).squeeze(-1)


# bf16 dense tensor-core peaks in FLOP/s, for estimate_mfu; matched against torch.cuda.get_device_name()
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "A10G": 70e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16; no bf16
    "T4": 65e12,  # fp16; no bf16
}


def peak_flops_for(device_name: str, default: float = 312e12) -> float:
    for name, flops in PEAK_FLOPS.items():  # most specific names come first
        if name in device_name:
            return flops
    return default


def from_checkpoint(path, device="cpu"):
    """Loads (model, checkpoint dict) from a train.py checkpoint (.pt) or a llama2.c model file (.bin).
    The one loader that train.py (resume), sample.py and export.py share."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one with train.py, or pass --checkpoint=PATH")
    if path.endswith(".bin"):
        import export  # llama2.c's format lives with its writer

        return export.load_llama2c(path, device)
    # our own checkpoints hold the config, optimizer and RNG states: load only files you trust
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as e:  # a text file, an empty or truncated copy
        why = " ".join(str(e).split())  # torch's messages run over several lines
        raise ValueError(f"{path} is not a checkpoint written by train.py ({type(e).__name__}: {why})") from e
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_args" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint written by train.py (no 'model' / 'model_args')")
    model = Transformer(ModelArgs.from_dict(checkpoint["model_args"]))
    try:  # strict: a missing key is an error, not silently random weights
        model.load_state_dict(checkpoint["model"], strict=True)
    except RuntimeError as e:  # torch lists the missing / unexpected keys and wrong shapes over many lines
        raise ValueError(f"{path} does not match its model_args: {' '.join(str(e).split())}") from e
    return model.to(device), checkpoint
