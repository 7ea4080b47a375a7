"""
The Llama model, in one file, read bottom-up:
- ModelArgs: the shape, one dataclass (defaults: the 15M TinyStories model)
- RMSNorm, computed in float32
- rotary position embeddings (Meta's interleaved pairs), their cos/sin always in float32
- grouped-query attention: one F.scaled_dot_product_attention call (flash kernels) for training and
  prefill, and a preallocated KV cache for decoding
- SwiGLU feed-forward; the token embedding tied to the output layer (the classifier), or untied
- three initialisations of fresh weights (INIT_SCHEMES)
- generation: generate_stream / generate, and sample_next (temperature, top-k, top-p)

Weight names follow Meta's release (wq wk wv wo, w1 w2 w3), so the llama2.c and Hugging Face exports
map one to one. Faster CPU kernels for the same math replace three of the plain computations when the
caller hands them to a model (llamatiny/cpu_kernels.py: attach): causal attention, and generation's step
and sampler.
"""
import inspect
import math
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
    # Hugging Face's tie_word_embeddings=False is tie_embeddings=False
    tie_embeddings: bool = True  # the classifier is the token embedding (llama2.c); False: its own matrix

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

    def num_params(self) -> int:
        # what Transformer(self).num_params() counts, from the shapes alone: building the model, even on the
        # meta device, takes over a second (torch's meta path for normal_ imports its compiler)
        head_dim = self.dim // self.n_heads
        attention = self.dim * head_dim * 2 * (self.n_heads + self.n_kv_heads)  # wq and wo, wk and wv
        feed_forward = 3 * self.dim * self.hidden_dim  # w1, w2, w3
        block = attention + feed_forward + 2 * self.dim  # and the two norms' gains
        classifier = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * block + self.dim + classifier

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


def precompute_rope(head_dim: int, end: int, theta: float, start: int = 0, device=None):
    # cos, sin at positions start .. end - 1, in float32 whatever the model's dtype (bf16 tables would be
    # ~2e-3 off training's); real tables, not complex numbers, which break torch.compile and NCCL
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))  # (head_dim/2,)
    angles = torch.arange(start, end, device=device).float()[:, None] * freqs[None, :]  # (T, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x: (B, T, n_heads, head_dim), rotating the interleaved pairs (x0, x1), (x2, x3), ... as Meta does
    # cos, sin: (T, head_dim/2)
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, head_dim/2, 2)
    x0, x1 = pairs.unbind(-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, T, H, head_dim/2, 2)
    return out.flatten(3).type_as(x)


def attention(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0):
    # q: (B, n_heads, Tq, head_dim); k, v: (B, n_kv_heads, Tk, head_dim) -> (B, n_heads, Tq, head_dim)
    if q.device.type == "cuda" and q.dtype == torch.float32 and k.size(1) != q.size(1):
        # CUDA in float32: flash needs half precision and the memory-efficient kernel takes no grouped
        # key/value heads; without copies of them SDPA falls back to its math kernel (all scores in memory)
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, n_heads, Tk, head_dim)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, enable_gqa=True)


def causal_attention(q, k, v, dropout_p=0.0):
    # training and prefill: each of the T queries sees the keys up to its own position
    return attention(q, k, v, is_causal=True, dropout_p=dropout_p)


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
        # (q, k, v, dropout_p) -> y, for training and prefill; a faster kernel may take its place
        # (llamatiny/cpu_kernels.py)
        self.causal_attention = causal_attention
        # KV cache for generation: (B, n_kv_heads, max_seq_len, head_dim), made by the first prefill
        self.cache_k = self.cache_v = None

    def forward(self, x, cos, sin, start_pos=None):
        # start_pos: None for training, else the cache position of x's first token
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        if start_pos is not None:  # generation: keep k, v for the tokens that follow
            self.write_cache(k, v, start_pos)

        if not start_pos:  # training (None) or a prefill (0): causal attention among these T tokens
            y = self.causal_attention(q, k, v, self.dropout if self.training else 0.0)
        else:  # decoding: the new tokens attend to every cached position up to their own
            end = start_pos + T
            k, v = self.cache_k[:, :, :end], self.cache_v[:, :, :end]  # (B, n_kv_heads, end, head_dim)
            # one new token sees the whole cache; in a chunk of several, query i (at start_pos + i) sees
            # keys 0 .. start_pos + i
            mask = None if T == 1 else torch.ones(T, end, dtype=torch.bool, device=x.device).tril(start_pos)
            y = attention(q, k, v, attn_mask=mask)

        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, dim)
        return self.resid_dropout(self.wo(y))

    def write_cache(self, k, v, start_pos: int):
        # k, v: (B, n_kv_heads, T, head_dim), written at positions start_pos .. start_pos + T - 1
        B, T = k.size(0), k.size(2)
        if start_pos == 0:  # a new sequence: a fresh cache, sized for this batch
            shape = (B, self.n_kv_heads, self.max_seq_len, self.head_dim)
            self.cache_k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.cache_v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        elif self.cache_k is None or self.cache_k.shape[0] != B:
            held = "no sequence" if self.cache_k is None else f"a batch of {self.cache_k.shape[0]}"
            raise ValueError(f"the KV cache holds {held}, not a batch of {B} at start_pos={start_pos}: "
                             "start each sequence with a prefill at start_pos=0")
        self.cache_k[:, :, start_pos:start_pos + T] = k
        self.cache_v[:, :, start_pos:start_pos + T] = v


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


# how fresh weights are drawn (train.py's weight_init): every matrix from a normal around 0, norm gains 1
INIT_SCHEMES = {
    "gpt2": "normal(0, 0.02); the projections into the residual stream (wo, w2) 0.02 / sqrt(2 n_layers)",
    "hf": "normal(0, 0.02) everywhere, as transformers' LlamaForCausalLM",
    "kaiming": "normal(0, sqrt(2 / fan_in)), fan_in the matrix's input width (He et al., kaiming_normal_)",
}


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, init: str = "gpt2"):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # one matrix, counted once
        # generation's step maker, (model) -> step(tokens, start_pos) -> logits, and its sampler: None is
        # the plain step of generate_stream; faster kernels may take their place (llamatiny/cpu_kernels.py)
        self.decoder, self.sampler = None, sample_next
        self.init_weights(init)

    def init_weights(self, scheme: str = "gpt2"):
        # scheme: one of INIT_SCHEMES. fan_in is the weight's second dimension, as torch reads it: in_features
        # of a Linear, dim for the embedding (and so for a tied classifier)
        if scheme not in INIT_SCHEMES:
            raise ValueError(f"init {scheme!r}: choose one of {', '.join(INIT_SCHEMES)}")
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if scheme == "kaiming":
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                else:
                    nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if scheme == "gpt2":  # GPT-2's scaled init on the two projections that write into the residual stream
            for name, p in self.named_parameters():
                if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.args.n_layers))

    def forward(self, tokens, targets=None, start_pos=None):
        # tokens: (B, T) int64; start_pos: None for training, else the cache position of tokens[:, 0]
        h = self.hidden_states(tokens, start_pos)  # (B, T, dim)
        if targets is None:  # inference: only the last position's logits are needed
            return self.output(h[:, [-1], :]), None  # (B, 1, vocab_size)
        logits = self.output(h)  # (B, T, vocab_size)
        # reshape, not view: targets may be a slice such as tokens[:, 1:]
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, tokens, start_pos=None):
        # everything before the classifier: (B, T) -> (B, T, dim), the final norm's output
        a, T, pos = self.args, tokens.size(1), start_pos or 0
        if pos + T > a.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds max_seq_len={a.max_seq_len}")
        cos, sin = precompute_rope(a.dim // a.n_heads, pos + T, a.rope_theta, start=pos, device=tokens.device)
        h = self.dropout(self.tok_embeddings(tokens))  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos)
        return self.norm(h)

    def num_params(self, non_embedding: bool = False) -> int:
        # non_embedding: without the token embedding, as transformers' num_parameters(exclude_embeddings=True)
        # counts: tied, that matrix is the classifier too and leaves with it; an untied classifier stays
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied matrix once
        return n - self.tok_embeddings.weight.numel() if non_embedding else n

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, muon: dict | None = None):
        # AdamW: decay matrices (embeddings and linear weights), not norms or biases. muon (Muon's lr,
        # momentum and weight_decay): Muon takes the blocks' matrices instead, AdamW keeps the embedding and
        # the norms. Each group's lr_scale is its peak learning rate over learning_rate: the schedule scales
        # them all
        named = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        hidden = [p for name, p in named if muon and name.startswith("layers.") and p.dim() == 2]
        rest = [p for _, p in named if all(p is not h for h in hidden)]
        groups = [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
        ]
        # fused: one kernel for all parameters; on CPU too, where torch's default is a per-parameter
        # Python loop (figures: bench/README.md)
        fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))
        if not hidden:
            return adamw
        # Muon's update is orthogonalised, its size set by lr alone (scaled by sqrt(rows / columns) for tall
        # matrices), so its learning rate is not AdamW's
        matrices = {"params": hidden, "lr_scale": muon["lr"] / learning_rate}
        return Optimizers(torch.optim.Muon([matrices], nesterov=True, **muon), adamw)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        # training FLOPs per token: each weight that multiplies costs 2 in the forward pass, 2 for its input's
        # gradient and 2 for its own gradient (6N, PaLM appendix B), that last 2 skipped for a frozen weight
        # (LoRA's base); plus attention's scores and values. An untied token embedding is a lookup, no
        # multiply: it is left out of N (tied, the same matrix is the classifier and counts)
        a = self.args
        T = seq_len or a.max_seq_len
        weights = [p for p in self.parameters() if a.tie_embeddings or p is not self.tok_embeddings.weight]
        n = sum(p.numel() for p in weights)
        frozen = sum(p.numel() for p in weights if not p.requires_grad)
        return 6 * n - 2 * frozen + 12 * a.n_layers * a.n_heads * (a.dim // a.n_heads) * T

    def estimate_mfu(self, tokens_per_iter: int, dt: float, peak_flops: float, seq_len=None) -> float:
        # model FLOPs utilisation: achieved FLOP/s over the device's peak (bf16 dense)
        return self.flops_per_token(seq_len) * tokens_per_iter / dt / peak_flops

    # ---------------------------------------------------------------- generation

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None,
                        repetition_penalty=1.0):
        """Yields new tokens, (B,) each, using the KV cache; ends after max_new_tokens, or once
        every row has produced stop_token (which is not yielded). repetition_penalty > 1 makes the tokens
        in the context less likely (penalize_repetition)."""
        def step(tokens, start_pos):  # (B, T) -> (B, vocab_size), the logits after the last token
            return self.output(self.hidden_states(tokens, start_pos)[:, -1, :])

        if self.decoder is not None:
            step = self.decoder(self)

        window = self.args.max_seq_len
        tokens = idx[:, -(window - 1):]  # a prompt longer than the context keeps its end
        logits = step(tokens, 0)  # prefill
        pos = tokens.size(1)
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if repetition_penalty != 1.0:
                logits = penalize_repetition(logits, tokens, repetition_penalty)
            next_token = self.sampler(logits, temperature, top_k, top_p)  # (B,)
            if stop_token is not None:
                done |= next_token == stop_token
                if done.all():
                    break
            yield next_token
            tokens = torch.cat((tokens, next_token[:, None]), dim=1)
            if pos == window:
                # context full: slide, keeping the latest half, and prefill it again at position 0
                tokens = tokens[:, -(window // 2):]
                logits = step(tokens, 0)
                pos = tokens.size(1)
            else:
                logits = step(next_token[:, None], pos)
                pos += 1

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None):
        # idx: (B, T) -> (B, T + n); rows that stopped early are padded with stop_token
        new = []
        for token in self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, stop_token):
            if stop_token is not None and new:
                token = torch.where(new[-1] == stop_token, stop_token, token)
            new.append(token)
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)


class Optimizers:
    """Several optimizers that step as one (Muon's matrices beside AdamW's rest): to the training loop, the
    gradient scaler and the checkpoint they are one optimizer whose param_groups are all of theirs."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict):
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)


def load_optimizer_state(optimizer, state: dict) -> None:
    # the checkpoint's moments and momentum buffers with this run's hyperparameters: load_state_dict alone
    # would bring back the saved learning rates, weight decay and betas, even those given again on resume
    ours = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, ours):
        group.update(settings)


def _candidates(logits, top_k=None, top_p=None, head=1024):
    """The tokens that survive top-k (exactly k, ties broken by torch.topk), then top-p: (values, index),
    both (B, k), values sorted descending with the excluded ones at -inf; index maps the columns to token
    ids (None: no filter, all tokens in order). sample_next draws from them."""
    V = logits.size(-1)
    top_k = top_k if top_k is not None and top_k < V else None
    top_p = top_p if top_p is not None and top_p < 1.0 else None
    if top_k is None and top_p is None:
        return logits, None
    # top-p needs the tokens in order of probability, but only the head of the distribution that it
    # keeps: a trained model's nucleus is tens to hundreds of tokens, and sorting 1024 candidates
    # (torch.topk) is much cheaper than sorting a 32,000 vocabulary (figures: bench/README.md)
    k = top_k or min(head, V)
    values, index = torch.topk(logits, k)  # (B, k), sorted descending
    if top_p is not None:
        # the probabilities of the distribution top-p acts on: after top-k that is the renormalised
        # top-k distribution; without it, the full distribution (so the head's mass may fall short)
        probs = values.softmax(-1) if top_k else (values - logits.logsumexp(-1, keepdim=True)).exp()
        cumulative = probs.cumsum(-1)
        if top_k is None and k < V and (cumulative[:, -1] < top_p).any():
            return _candidates(logits, None, top_p, head=V)  # a flat distribution: sort all of it
        # drop a token when the tokens before it already reach top_p; the most likely always stays
        values = values.masked_fill(cumulative - probs >= top_p, -float("inf"))
    return values, index


def penalize_repetition(logits, tokens, penalty: float):
    # CTRL's repetition penalty (Keskar et al., 2019): the logit of each token in the context is divided by
    # penalty where it is positive and multiplied by it where negative, so penalty > 1 makes every token
    # already there less likely, however often it occurs. Before the sampler: any sampler, greedy included.
    seen = logits.gather(-1, tokens)  # (B, T): logits (B, vocab_size), tokens (B, T)
    return logits.scatter(-1, tokens, torch.where(seen > 0, seen / penalty, seen * penalty))


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    # logits: (B, vocab_size) -> (B,) token ids; temperature 0 is greedy
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    values, index = _candidates(logits.float() / temperature, top_k, top_p)  # (B, k)
    cdf = values.softmax(-1).cumsum(-1)  # (B, k); excluded tokens add 0
    # inverse CDF: the first column whose cumulative probability reaches u, for u uniform in (0, total].
    # u > 0 and cdf[j - 1] < u <= cdf[j] give column j a probability above zero, so a filtered token is
    # never drawn; u <= total keeps the search inside the row. Faster than torch.multinomial (figures:
    # bench/README.md), and as deterministic under manual_seed.
    u = (1.0 - torch.rand(cdf.size(0), 1, device=cdf.device, dtype=cdf.dtype)) * cdf[:, -1:]  # (B, 1)
    choice = torch.searchsorted(cdf, u)  # (B, 1)
    return (choice if index is None else index.gather(-1, choice)).squeeze(-1)

