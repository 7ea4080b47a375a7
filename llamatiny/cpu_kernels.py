"""
Faster CPU kernels for computations model.py and train.py do in the plain way. Nothing here changes a
result beyond float rounding: each kernel falls back on model.py's own function where it has no trick to
apply, and each is tested against the plain path it replaces (tests/test_cpu_kernels.py, which runs every
ModelArgs field through both); bench/README.md has the figures that justify them.

- causal_attention: training attention with dropout taken in blocks of queries, and a kernel of our
  own for heads 8 wide or less (the 260K model); model.py's for everything else
- Decoder, sample_next: generation's one-token steps on packed weights, and top-p without a sort
- keep_freed_memory: glibc keeps freed memory for the next training step

A model gets the first two from attach(model): train.py, sample.py and eval.py call it for a model on the
CPU unless --cpu_speedups=False; sample.py and eval.py, whose weights no longer change, with frozen=True,
which packs generation's weights once, at load. model.py does not import this module.
"""
import ctypes

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import model as plain  # the plain path these kernels replace


def attach(model, frozen: bool = False):
    """Hands a model on the CPU these kernels in place of its plain ones: causal attention for training and
    prefill, generation's decoder and sampler. Returns the model. A frozen model's weights are packed for
    the decoder here, once, rather than at each generation: only for a model whose weights no longer
    change (Decoder says why)."""
    for layer in model.layers:
        layer.attention.causal_attention = causal_attention
    model.decoder, model.sampler = Decoder, sample_next
    if frozen:
        model.decoder = Decoder(model).reuse  # a bound method: a deep copy of the model packs its own copy
    return model


# ----------------------------------------------------------------- attention

def causal_attention(q, k, v, dropout_p: float = 0.0):
    """model.causal_attention through the fastest CPU kernel for the shape; model.py's own where no trick
    applies."""
    # q: (B, n_heads, T, head_dim); k, v: (B, n_kv_heads, T, head_dim)
    if dropout_p > 0:
        return causal_attention_in_blocks(q, k, v, dropout_p)
    # our kernel computes in float32 (autocast casts its inputs); a half-precision model without autocast
    # keeps PyTorch's kernel, which accumulates in float32 too. Under torch.compile, PyTorch's too: the
    # compiler would unroll the loop over blocks, and compiling would take far longer than it could save.
    in_float32 = q.dtype == torch.float32 or torch.is_autocast_enabled("cpu")
    if q.size(-1) <= 8 and q.size(2) <= 512 and in_float32 and not torch.compiler.is_compiling():
        return small_head_causal_attention(q, k, v)
    return plain.causal_attention(q, k, v)


def causal_attention_in_blocks(q, k, v, dropout_p: float, block: int = 64):
    # Causal attention with dropout on the attention weights. PyTorch's CPU flash kernel has no dropout,
    # so scaled_dot_product_attention with dropout_p > 0 falls back to its math path: the whole
    # (B, heads, T, T) score matrix in memory, half of it computed only to be masked. Taking the queries
    # 64 at a time, each block scores only the keys it can see, in pieces that fit in cache. Row for row
    # it is the same computation (softmax over the visible keys, then dropout). Figures: bench/README.md
    # q: (B, n_heads, T, head_dim); k, v: (B, n_kv_heads, T, head_dim)
    T = q.size(2)
    out = []
    for start in range(0, T, block):
        end = min(start + block, T)
        # query start + i sees keys 0 .. start + i
        mask = torch.ones(end - start, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        y = plain.attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], attn_mask=mask,
                            dropout_p=dropout_p)  # (B, n_heads, block, head_dim)
        out.append(y)
    return torch.cat(out, dim=2)  # (B, n_heads, T, head_dim)


def _blocks(n_heads_total: int, T: int, block: int = 128):
    # (heads, queries) pieces: queries `block` at a time, and groups of heads whose (block, T) score
    # matrices take about 1 MB together, so that they stay in cache. Each product shares its group out
    # among the threads, so with several threads the groups grow with them: at 2 threads 4x the heads
    # was fastest (bench/README.md); 2x per thread beyond that is the same rule, not measured
    threads = torch.get_num_threads()
    step = max(1, 2**18 // (block * T)) * (2 * threads if threads > 1 else 1)
    return [(slice(h, min(h + step, n_heads_total)), a, min(a + block, T))
            for h in range(0, n_heads_total, step) for a in range(0, T, block)]


class SmallHeadCausalAttention(torch.autograd.Function):
    """Causal attention for heads 8 wide or less and T <= 512 (the 260K model). PyTorch's CPU flash
    kernel takes queries 32 - 64 at a time below 768 tokens, and with 8-wide heads its per-block overhead
    is most of the work. Here a group of heads and 128 queries a:b get their scores against keys 0:b (the
    ones they can see: the masked half of the (T, T) matrix is mostly skipped) at once, small enough for
    the cache, and the backward pass recomputes them instead of keeping them. The narrow products are
    written transposed (v^T p^T rather than p v), the layout MKL multiplies fastest. From head_dim 16, or
    past T 512, PyTorch's kernel wins, hence the bounds. Figures: bench/README.md"""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, q, k, v):
        # q, k, v: (B, heads, T, head_dim), k and v already repeated to the query heads
        B, H, T, hd = q.shape
        q, k, v = (t.reshape(B * H, T, hd) for t in (q, k, v))
        mask = torch.full((T, T), -float("inf"), dtype=q.dtype, device=q.device).triu_(1)  # the future: -inf
        y_t = q.new_empty(B * H, hd, T)
        for s, a, b in _blocks(B * H, T):
            # queries a:b against keys 0:b, (heads, b - a, b)
            p = torch.baddbmm(mask[a:b, :b], q[s, a:b], k[s, :b].transpose(1, 2), alpha=hd**-0.5).softmax(-1)
            torch.bmm(v[s, :b].transpose(1, 2), p.transpose(1, 2), out=y_t[s, :, a:b])  # y^T = v^T p^T
        y = y_t.transpose(1, 2).contiguous()  # (B * H, T, hd)
        ctx.save_for_backward(q, k, v, y, mask)
        ctx.shape = (B, H, T, hd)
        return y.view(B, H, T, hd)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dy):
        q, k, v, y, mask = ctx.saved_tensors
        n, T, hd = q.shape
        dy = dy.reshape(n, T, hd)
        dy_dot_y = (dy * y).sum(-1, keepdim=True)  # (n, T, 1): each row's sum of p * dp
        dq_t = q.new_empty(n, hd, T)
        dk_t, dv_t = q.new_zeros(n, hd, T), q.new_zeros(n, hd, T)  # keys 0:b gather from every block after
        for s, a, b in _blocks(n, T):
            p = torch.baddbmm(mask[a:b, :b], q[s, a:b], k[s, :b].transpose(1, 2), alpha=hd**-0.5).softmax(-1)
            dv_t[s, :, :b].baddbmm_(dy[s, a:b].transpose(1, 2), p)  # dv^T += dy^T p
            ds = torch.bmm(dy[s, a:b], v[s, :b].transpose(1, 2))  # dp = dy v^T, (heads, b - a, b)
            ds.sub_(dy_dot_y[s, a:b]).mul_(p)  # through the softmax: ds = p * (dp - sum(p * dp))
            torch.bmm(k[s, :b].transpose(1, 2), ds.transpose(1, 2), out=dq_t[s, :, a:b])  # dq^T = k^T ds^T
            dk_t[s, :, :b].baddbmm_(q[s, a:b].transpose(1, 2), ds)  # dk^T += q^T ds
        dq, dk, dv = dq_t.transpose(1, 2) * hd**-0.5, dk_t.transpose(1, 2) * hd**-0.5, dv_t.transpose(1, 2)
        return dq.reshape(ctx.shape), dk.reshape(ctx.shape), dv.reshape(ctx.shape)


def small_head_causal_attention(q, k, v):
    # q: (B, n_heads, T, head_dim); k, v: (B, n_kv_heads, T, head_dim)
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, n_heads, T, head_dim)
    return SmallHeadCausalAttention.apply(q, k, v)


# ----------------------------------------------------------------- generation

class Decoder:
    """model.generate_stream's step on a CPU: (tokens (B, T), start_pos) -> (B, vocab_size), the logits
    after the last token, as model.output(model.hidden_states(tokens, start_pos)[:, -1]) computes them.

    A prefill runs the model's own forward. Each one-token step after it runs decode() here: decoding one
    token reads every weight once (the 15M model's 61 MB, more than the cache holds), so a step costs that
    memory traffic plus a few microseconds per PyTorch call, of which the plain forward makes ~35 a layer
    and decode() ~15, on weights packed for it:
    - every matrix transposed and contiguous: MKL's (B, dim) x (dim, out) runs faster against it than
      against nn.Linear's (out, dim) weight (for the 32,000-row classifier, several times faster)
    - wq|wk|wv and w1|w3 stacked into one matrix each
    - RMSNorm's gain folded into the matrix that follows it, (x * g) W^T = x (g W^T), as is the attention's
      1/sqrt(head_dim) into wq; what is left of the norm is one batched dot product per layer input
    - RoPE at one position as one complex multiply, in place (Meta's own formulation of the rotation)
    - buffers, and the views of them each step reads and writes, made once per prefill; the KV cache is the
      model's own, written in place at each position
    The weights are packed per generation and dropped after it: a copy kept across calls could go stale
    unnoticed (the fused AdamW step changes a weight in place without bumping its _version). A model loaded
    only to generate (attach(model, frozen=True): sample.py, eval.py) keeps one packing instead, made at
    load, which takes ~40 ms, a tenth of a 15M model's 100 tokens on one core. Only float32
    models whose projections are plain nn.Linear, in eval mode or without dropout, decode here; any other
    (bfloat16, LoRA adapters, sample.py --compile's compiled forward) runs the model's forward for every
    step, still with the transposed classifier. On a GPU the plain path is the fast one. Figures:
    bench/README.md"""

    def __init__(self, model):
        self.model = model
        self.classifier = model.output.weight.detach().t().contiguous()  # (dim, vocab_size)
        self.layers = self.pack(model) if self.packable(model) else None

    def reuse(self, model):
        # model.decoder's signature, (model) -> step, for a packing made once (attach's frozen)
        assert model is self.model
        return self

    @staticmethod
    def packable(model) -> bool:
        projections = [getattr(layer.attention, name)
                       for layer in model.layers for name in ("wq", "wk", "wv", "wo")]
        projections += [getattr(layer.feed_forward, name)
                        for layer in model.layers for name in ("w1", "w2", "w3")]
        return (model.output.weight.dtype == torch.float32 and all(type(p) is nn.Linear for p in projections)
                and not (model.training and model.args.dropout > 0)
                and "hidden_states" not in vars(model))  # sample.py --compile replaces the method

    def pack(self, model) -> list:
        a = model.args
        head_dim = a.dim // a.n_heads
        # rsqrt(mean(x^2) + eps) = sqrt(dim) * rsqrt(sum(x^2) + dim * eps): the sqrt(dim) goes into the gains
        scale = a.dim**0.5
        self.eps = torch.tensor(a.dim * a.norm_eps)
        self.gain = model.norm.weight.detach() * scale  # the final norm's, applied before the classifier
        self.embedding = model.tok_embeddings.weight.detach()
        cos, sin = plain.precompute_rope(head_dim, a.max_seq_len, a.rope_theta)
        self.rope = torch.complex(cos, sin)  # (max_seq_len, head_dim/2): e^(i * angle)
        layers = []
        for layer in model.layers:
            at, ff = layer.attention, layer.feed_forward
            g1 = layer.attention_norm.weight.detach()[:, None] * scale  # (dim, 1)
            g2 = layer.ffn_norm.weight.detach()[:, None] * scale
            wqkv = torch.cat((at.wq.weight * head_dim**-0.5, at.wk.weight, at.wv.weight)).detach().t() * g1
            w13 = torch.cat((ff.w1.weight, ff.w3.weight)).detach().t() * g2  # (dim, 2 * hidden_dim)
            layers.append((wqkv.contiguous(), at.wo.weight.detach().t().contiguous(), w13.contiguous(),
                           ff.w2.weight.detach().t().contiguous()))
        return layers

    def __call__(self, tokens, start_pos: int):
        if self.layers is None or start_pos == 0 or tokens.size(1) > 1:
            h = self.model.hidden_states(tokens, start_pos)[:, -1, :]  # (B, dim)
            if self.layers is not None and start_pos == 0:  # a new sequence, so new KV caches
                self.bind(tokens.size(0))
            return h @ self.classifier
        return self.decode(tokens[:, 0], start_pos)

    def bind(self, B: int):
        # buffers for a batch of B, and their views that decode() reads and writes
        a = self.model.args
        H, KV, hd = a.n_heads, a.n_kv_heads, a.dim // a.n_heads
        self.x = torch.empty(B, a.dim)  # the residual stream
        self.x_rows, self.x_cols = self.x.view(B, 1, a.dim), self.x.view(B, a.dim, 1)
        self.inv_rms = torch.empty(B, 1, 1)
        self.r = self.inv_rms.view(B, 1)
        self.qkv = torch.empty(B, (H + 2 * KV) * hd)
        self.q, self.q_heads = self.qkv[:, :H * hd], (B * KV, H // KV, hd)  # heads grouped by kv head
        self.qk = torch.view_as_complex(self.qkv[:, :(H + KV) * hd].view(B, H + KV, hd // 2, 2))
        # q grouped by kv head: for one sequence a view made here, for a batch a copy made at each step
        self.q_grouped = self.q.view(self.q_heads) if B == 1 else None
        self.k = self.qkv[:, H * hd:(H + KV) * hd].view(B, KV, hd)
        self.v = self.qkv[:, (H + KV) * hd:].view(B, KV, hd)
        self.y = torch.empty(B * KV, H // KV, hd)  # the attention's output
        self.y_rows = self.y.view(B, a.dim)
        self.h13 = torch.empty(B, 2 * a.hidden_dim)
        self.h1, self.h3 = self.h13[:, :a.hidden_dim], self.h13[:, a.hidden_dim:]
        # the model's own KV caches, (B, n_kv_heads, max_seq_len, head_dim), and for the products over them
        # keys as (B * n_kv_heads, head_dim, max_seq_len), values as (B * n_kv_heads, max_seq_len, head_dim)
        self.caches = [(at.cache_k, at.cache_v, at.cache_k.flatten(0, 1).transpose(1, 2),
                        at.cache_v.flatten(0, 1)) for at in (layer.attention for layer in self.model.layers)]

    def decode(self, token, pos: int):
        # token: (B,) at position pos -> (B, vocab_size). Every tensor a layer reads or writes is bound to a
        # local name first: at ~20 calls a layer, attribute lookups are part of the cost
        x, r, inv_rms, eps, x_rows, x_cols = self.x, self.r, self.inv_rms, self.eps, self.x_rows, self.x_cols
        qkv, qk, k, v, y, y_rows = self.qkv, self.qk, self.k, self.v, self.y, self.y_rows
        h13, h1, h3 = self.h13, self.h1, self.h3
        torch.index_select(self.embedding, 0, token, out=x)  # (B, dim)
        rotation = self.rope[pos]  # (head_dim/2,)
        n = pos + 1  # the positions attended to
        for (wqkv, wo, w13, w2), (cache_k, cache_v, keys_t, values) in zip(self.layers, self.caches,
                                                                           strict=True):
            torch.baddbmm(eps, x_rows, x_cols, out=inv_rms).rsqrt_()  # (B, 1, 1)
            torch.mm(x, wqkv, out=qkv).mul_(r)  # RMSNorm, then q, k, v
            qk.mul_(rotation)  # RoPE on q and k
            cache_k.select(2, pos).copy_(k)  # what the model's write_cache does, without its checks
            cache_v.select(2, pos).copy_(v)
            q = self.q_grouped if self.q_grouped is not None else self.q.reshape(self.q_heads)
            scores = torch.bmm(q, keys_t[:, :, :n])  # (B * n_kv_heads, n_rep, n), already scaled
            torch.bmm(scores.softmax(-1), values[:, :n], out=y)
            x.addmm_(y_rows, wo)  # x += y wo^T
            torch.baddbmm(eps, x_rows, x_cols, out=inv_rms).rsqrt_()
            torch.mm(x, w13, out=h13).mul_(r)
            x.addmm_(F.silu(h1, inplace=True).mul_(h3), w2)  # x += (silu(h1) * h3) w2^T
        torch.baddbmm(eps, x_rows, x_cols, out=inv_rms).rsqrt_()
        return torch.mm(x.mul_(r).mul_(self.gain), self.classifier)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """model.sample_next, with top-p sampling (without top-k) done without sorting the vocabulary: draw
    from the whole distribution, and draw again while the token falls outside the nucleus (the tokens more
    likely than it already hold top_p of the mass). The accepted draws follow the nucleus's renormalised
    distribution exactly, and a draw is accepted with probability >= top_p, so it takes 1 / top_p draws at
    most on average. Sorting 32,000 probabilities (all of them, for a freshly initialised model's near-
    uniform distribution, or torch.topk's 1024 for a peaked one) costs more than the forward pass of
    a small model on a CPU; this is a few passes over the probabilities. A token tied in probability
    with the least likely one kept is kept too, where the sort would keep some of them. Figures:
    bench/README.md"""
    if temperature == 0.0 and logits.dtype == torch.float32:
        # the same first maximum, found ~10x faster by numpy's vectorised argmax on this CPU
        return torch.from_numpy(logits.numpy().argmax(-1))
    if temperature == 0.0 or top_k is not None or top_p is None or top_p >= 1.0:
        return plain.sample_next(logits, temperature, top_k, top_p)
    probs = (logits.float() / temperature).softmax(-1)  # (B, V)
    cdf = probs.cumsum(-1).numpy()  # each draw below is a few scalar steps: numpy's, without torch's overhead
    tokens = []
    for row, row_cdf in zip(probs, cdf, strict=True):
        while True:
            u = (1.0 - torch.rand(()).item()) * row_cdf[-1]  # in (0, total]
            draw = int(np.searchsorted(row_cdf, u))  # inverse CDF: the first cdf >= u, as model.sample_next
            # inside the nucleus when the tokens more likely than it hold less than top_p (F.threshold keeps
            # the probabilities above the draw's: one pass, where torch.where + sum takes four)
            if F.threshold(row, row[draw].item(), 0.0).sum() < top_p:
                tokens.append(draw)
                break
    return torch.tensor(tokens)  # (B,)


# ----------------------------------------------------------------- memory

def keep_freed_memory() -> bool:
    """On Linux (glibc): serve large tensors from the heap and keep freed memory there for the next
    step, instead of returning each block to the system. By default glibc maps every block above 32 MB
    fresh from the kernel, so the 15M model's (4096, 32000) logits and their gradients (0.5 GB each)
    are paged in from zero at every step. The process keeps its peak memory until it exits, which is
    why only train.py's main() calls this, never a library function. Returns whether it applied.
    Figures: bench/README.md"""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # macOS, Windows, musl: nothing to tune
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters
    # no block mapped on its own, and the heap's top never handed back
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
