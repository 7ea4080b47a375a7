"""
Faster CPU paths for the same computations model.py and train.py do in the plain way. Nothing here
changes a result beyond float rounding; each piece is tested against the plain path it replaces
(tests/test_cpu_speedups.py), and bench/README.md has the figures that justify it.

- causal_attention: training attention with dropout taken in blocks of queries, and a kernel of our
  own for heads 8 wide or less (the 260K model); PyTorch's attention for everything else
- transposed_classifier: the decode step's classifier against a contiguous (dim, vocab) copy
- keep_freed_memory: glibc keeps freed memory for the next training step

model.py and train.py use them only where ENABLED is True (the default; train.py and sample.py set
it from --cpu_speedups), the way torch.backends.cudnn.enabled switches cuDNN.
"""
import ctypes

import torch
import torch.nn.functional as F

ENABLED = True


# ----------------------------------------------------------------- attention

def causal_attention(q, k, v, dropout_p: float = 0.0):
    """F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=True)
    through the fastest CPU kernel for the shape; PyTorch's own where no trick applies."""
    # q: (B, n_heads, T, head_dim); k, v: (B, n_kv_heads, T, head_dim)
    if dropout_p > 0:
        return causal_attention_in_blocks(q, k, v, dropout_p)
    # our kernel computes in float32 (autocast casts its inputs); a half-precision model without autocast
    # keeps PyTorch's kernel, which accumulates in float32 too
    in_float32 = q.dtype == torch.float32 or torch.is_autocast_enabled("cpu")
    if q.size(-1) <= 8 and q.size(2) <= 512 and in_float32:
        return small_head_causal_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


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
        y = F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], attn_mask=mask,
                                           dropout_p=dropout_p, enable_gqa=True)  # (B, n_heads, block, hd)
        out.append(y)
    return torch.cat(out, dim=2)  # (B, n_heads, T, head_dim)


def _head_chunks(n_heads_total: int, T: int):
    # groups of heads whose (T, T) score matrices take about 2 MB together: they stay in cache
    step = max(1, 2**19 // (T * T))
    return [slice(s, min(s + step, n_heads_total)) for s in range(0, n_heads_total, step)]


class SmallHeadCausalAttention(torch.autograd.Function):
    """Causal attention for heads 8 wide or less and T <= 512 (the 260K model). PyTorch's CPU flash
    kernel takes queries 32 - 64 at a time below 768 tokens, and with 8-wide heads its per-block overhead
    is most of the work. Here each group of heads gets its whole (T, T) score matrix at once, small
    enough for the cache, and the backward pass recomputes it instead of keeping it. The narrow products
    are written transposed (v^T p^T rather than p v), the layout MKL multiplies fastest. From head_dim 16,
    or past T 512, PyTorch's kernel wins, hence the bounds. Figures: bench/README.md"""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, q, k, v):
        # q, k, v: (B, heads, T, head_dim), k and v already repeated to the query heads
        B, H, T, hd = q.shape
        q, k, v = (t.reshape(B * H, T, hd) for t in (q, k, v))
        mask = torch.full((T, T), -float("inf"), dtype=q.dtype, device=q.device).triu_(1)  # the future: -inf
        y_t = q.new_empty(B * H, hd, T)
        for s in _head_chunks(B * H, T):
            p = torch.baddbmm(mask, q[s], k[s].transpose(1, 2), alpha=hd**-0.5).softmax(-1)  # (heads, T, T)
            torch.bmm(v[s].transpose(1, 2), p.transpose(1, 2), out=y_t[s])  # y^T = v^T p^T
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
        dq_t, dk_t, dv_t = (q.new_empty(n, hd, T) for _ in range(3))
        for s in _head_chunks(n, T):
            p = torch.baddbmm(mask, q[s], k[s].transpose(1, 2), alpha=hd**-0.5).softmax(-1)  # recomputed
            torch.bmm(dy[s].transpose(1, 2), p, out=dv_t[s])  # dv^T = dy^T p
            ds = torch.bmm(dy[s], v[s].transpose(1, 2))  # dp = dy v^T, (heads, T, T)
            ds.sub_(dy_dot_y[s]).mul_(p)  # through the softmax: ds = p * (dp - sum(p * dp))
            torch.bmm(k[s].transpose(1, 2), ds.transpose(1, 2), out=dq_t[s])  # dq^T = k^T ds^T
            torch.bmm(q[s].transpose(1, 2), ds, out=dk_t[s])  # dk^T = q^T ds
        dq, dk, dv = dq_t.transpose(1, 2) * hd**-0.5, dk_t.transpose(1, 2) * hd**-0.5, dv_t.transpose(1, 2)
        return dq.reshape(ctx.shape), dk.reshape(ctx.shape), dv.reshape(ctx.shape)


# torch.compile would unroll the loop over head groups: compiling takes far longer than it could save
@torch.compiler.disable
def small_head_causal_attention(q, k, v):
    # q: (B, n_heads, T, head_dim); k, v: (B, n_kv_heads, T, head_dim)
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, n_heads, T, head_dim)
    return SmallHeadCausalAttention.apply(q, k, v)


# ----------------------------------------------------------------- generation

def transposed_classifier(weight):
    """h -> h @ weight.T, as nn.Linear(dim, vocab_size) computes it, for one generation's decode steps.
    The classifier (B, dim) x (dim, vocab_size) is the largest matmul of a decode step, and MKL computes
    it faster against a contiguous copy of weight.T than against nn.Linear's (vocab_size, dim) weight.
    Make the copy per generation and drop it after: the weights cannot change under it then, whereas a
    copy kept across calls could go stale unnoticed (the fused AdamW step changes a weight in place
    without bumping its _version). CPU only: on a GPU the transposed weight is cuBLAS's ordinary
    operand, not worth a second copy of the largest matrix. Figures: bench/README.md"""
    weight_t = weight.detach().t().contiguous()  # (dim, vocab_size)
    return lambda h: h @ weight_t


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
