"""
Training-step throughput of model.py: forward + backward + grad clip + AdamW step, in tokens/s,
for the 260K config (batch 32 x 512, vocab 512) and the 15M config (batch 16 x 256, vocab 32000).

Beside ours, on the same weights and batch, it times a llama2.c-style baseline: the same Llama written
the way llama2.c's model.py writes it (our own code, below, kept separate so that every change to
model.py shows up against it), with llama2.c's choices: key/value heads repeated into new tensors for
grouped-query attention (repeat_kv) instead of SDPA's enable_gqa, PyTorch's attention for every head
size, torch's default AdamW (on a CPU a per-parameter Python loop; llama2.c asks for fused only on
CUDA) and glibc's default allocator settings. Both must give the same loss. Each model is timed in a
fresh process of its own, one after the other (cpu_kernels.keep_freed_memory() changes the whole process),
so on a shared machine run it twice; the figures are the median and the best step. Against llama2.c's
own train.py (a checkout beside the project), whole training steps side by side: bench_train.py --peer.

Findings on that CPU (2 cores, float32): the 15M step is matrix multiplies (MKL, ~70% of the CPU's
peak) and the cross-entropy over the 4096 x 32000 logits, which took 1.6 s of 4.4 s until
cpu_kernels.keep_freed_memory() stopped glibc from paging the 0.5 GB logits and gradients in from zero at
every step (0.2 s now). The 260K step was 78% PyTorch's CPU flash attention, slow with 8-wide heads;
cpu_kernels.SmallHeadCausalAttention halves it. Fused AdamW (model.py's default on CPU too) cuts the 15M
optimizer step from ~150 ms to ~10 ms. torch.compile: ~+10% on 260K, ~0 on 15M, 25-40 s to compile.
Tried and dropped: F.rms_norm, a cheaper RoPE, fused QKV / w1-w3 matmuls (each < 1% of a step),
query-chunked causal attention (slower), THP_MEM_ALLOC_ENABLE=1 (slower than keeping freed memory).

    python bench/bench_model.py                                  # CPU, float32, eager, both configs
    python bench/bench_model.py --compile                        # ours torch.compile'd (compile time shown)
    python bench/bench_model.py --config 15m --steps 10
    python bench/bench_model.py --device cuda --compile --dtype bfloat16   # tokens/s and MFU on a GPU
"""
import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # model.py lives at the repo root
import model  # noqa: E402
from llamatiny import cpu_kernels, runtime  # noqa: E402

CONFIGS = {  # name -> (model args, batch size); the sequence length is max_seq_len
    "260k": (dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4,
                  max_seq_len=512), 32),
    "15m": (dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, multiple_of=32,
                 max_seq_len=256), 16),
}


# ----------------------------------------------------------------- the llama2.c-style baseline

class BaselineRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def baseline_rope(x, cos, sin):
    # x: (B, T, H, head_dim); interleaved pairs, as llama2.c's apply_rotary_emb
    xr, xi = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)  # (B, T, H, head_dim/2) each
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1)
    return out.flatten(3).type_as(x)


def repeat_kv(x, n_rep):
    # (B, T, n_kv_heads, head_dim) -> (B, T, n_kv_heads * n_rep, head_dim), materialised
    B, T, n_kv, hd = x.shape
    if n_rep == 1:
        return x
    return x[:, :, :, None, :].expand(B, T, n_kv, n_rep, hd).reshape(B, T, n_kv * n_rep, hd)


class BaselineBlock(nn.Module):
    def __init__(self, a: model.ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.dim // a.n_heads
        self.attention = nn.Module()
        for name, n_out in (("wq", a.n_heads), ("wk", a.n_kv_heads), ("wv", a.n_kv_heads)):
            setattr(self.attention, name, nn.Linear(a.dim, n_out * self.head_dim, bias=False))
        self.attention.wo = nn.Linear(a.dim, a.dim, bias=False)
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = nn.Linear(a.dim, a.hidden_dim, bias=False)
        self.feed_forward.w2 = nn.Linear(a.hidden_dim, a.dim, bias=False)
        self.feed_forward.w3 = nn.Linear(a.dim, a.hidden_dim, bias=False)
        self.attention_norm = BaselineRMSNorm(a.dim, a.norm_eps)
        self.ffn_norm = BaselineRMSNorm(a.dim, a.norm_eps)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        at, ff = self.attention, self.feed_forward
        h = self.attention_norm(x)
        q = at.wq(h).view(B, T, self.n_heads, self.head_dim)
        k = at.wk(h).view(B, T, self.n_kv_heads, self.head_dim)
        v = at.wv(h).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = baseline_rope(q, cos, sin), baseline_rope(k, cos, sin)
        n_rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, n_heads, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + at.wo(y.transpose(1, 2).contiguous().view(B, T, -1))
        h = self.ffn_norm(x)
        return x + ff.w2(F.silu(ff.w1(h)) * ff.w3(h))


class Baseline(nn.Module):
    def __init__(self, a: model.ModelArgs):
        super().__init__()
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(BaselineBlock(a) for _ in range(a.n_layers))
        self.norm = BaselineRMSNorm(a.dim, a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight
        cos, sin = model.precompute_rope(a.dim // a.n_heads, a.max_seq_len, a.rope_theta)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

    def forward(self, tokens, targets):
        T = tokens.size(1)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.freqs_cos[:T], self.freqs_sin[:T])
        logits = self.output(self.norm(h))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = list(self.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        extra = {"fused": True} if device_type == "cuda" else {}  # llama2.c: fused on CUDA only
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)


# ----------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Runner:
    """One model + optimizer and a timed training step."""

    def __init__(self, net, device, dtype, compile_):
        self.raw, self.device = net, device
        self.optimizer = net.configure_optimizers(0.1, 5e-4, (0.9, 0.95), device.type)
        self.net = torch.compile(net) if compile_ else net
        # float32 runs without autocast; bf16/fp16 the way train.py does it (weights stay fp32)
        self.ctx = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                    else contextlib.nullcontext())
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(self, x, y):
        sync(self.device)
        t0 = time.perf_counter()
        with self.ctx:
            _, loss = self.net(x, y)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.raw.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - t0


def build(cfg_name, which, device):
    margs, batch_size = CONFIGS[cfg_name]
    margs = model.ModelArgs(**margs)
    torch.manual_seed(1337)  # the same weights and batch for both models
    net = model.Transformer(margs)
    if which == "baseline":
        base = Baseline(margs)
        base.load_state_dict(net.state_dict())
        net = base
    elif device.type == "cpu":
        cpu_kernels.attach(net)  # as train.py runs on a CPU
    x = torch.randint(0, margs.vocab_size, (batch_size, margs.max_seq_len))
    y = torch.randint(0, margs.vocab_size, (batch_size, margs.max_seq_len))
    return net.to(device), x.to(device), y.to(device)


def time_model(cfg_name, which, args, device, dtype) -> dict:
    """Times one model in this process; main() runs it in a child process per model (see below)."""
    if which == "ours" and device.type == "cpu":
        cpu_kernels.keep_freed_memory()  # as train.py sets it up; llama2.c keeps glibc's defaults
    net, x, y = build(cfg_name, which, device)
    r = Runner(net, device, dtype, args.compile if which == "ours" else args.baseline_compile)
    t0 = time.perf_counter()
    r.step(x, y)  # compiles (when asked) and warms the allocator
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        r.step(x, y)
    times = [r.step(x, y) for _ in range(args.steps)]
    return {"median": statistics.median(times), "best": min(times), "first": first}


def bench_config(cfg_name, args, device, dtype):
    ours, x, y = build(cfg_name, "ours", device)
    T = ours.args.max_seq_len
    tokens = x.numel()
    print(f"\n== {cfg_name}: {ours.num_params():,} params, batch {x.size(0)} x {T} = {tokens:,} tokens/step, "
          f"{device.type} {str(dtype).removeprefix('torch.')}, threads {torch.get_num_threads()}")
    names = {"ours": "ours" + (" (compiled)" if args.compile else "")}
    if not args.no_baseline:
        base, _, _ = build(cfg_name, "baseline", device)
        ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            diff = abs(ours(x, y)[1].item() - base(x, y)[1].item())
        print(f"same weights, same batch: |loss(ours) - loss(baseline)| = {diff:.2e}")
        if diff > (1e-4 if dtype == torch.float32 else 5e-2):
            raise SystemExit(f"error: the baseline and model.py disagree (loss difference {diff:.2e})")
        names["baseline"] = "llama2.c-style baseline" + (" (compiled)" if args.baseline_compile else "")
        del base

    # Each model is timed in a fresh process: cpu_kernels.keep_freed_memory() changes how the whole
    # process allocates, so a baseline sharing our process would silently get it too.
    results = {}
    for which, name in names.items():
        cmd = [sys.executable, __file__, "--config", cfg_name, "--model", which, *child_args(args)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"error: timing {which} failed:\n{out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[which] = r["median"]
        line = (f"{name:<34} {tokens / r['median']:>10,.0f} tok/s (median {r['median'] * 1e3:8.1f} ms/step, "
                f"best {r['best'] * 1e3:8.1f} ms = {tokens / r['best']:,.0f} tok/s)")
        if "compiled" in name:  # inductor caches kernels on disk: a repeated run compiles much faster
            line += f"; compile ~{max(r['first'] - r['median'], 0.0):.1f} s (first step {r['first']:.1f} s)"
        if device.type == "cuda":  # both run the same model, so ours' FLOP count serves both
            peak = runtime.peak_flops_for(torch.cuda.get_device_name())
            mfu = ours.estimate_mfu(tokens, r["median"], peak, seq_len=T)
            line += f"; MFU {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOPS"
        print(line, flush=True)
    if "baseline" in results:
        print(f"speedup over the llama2.c-style baseline, same run: "
              f"{results['baseline'] / results['ours']:.2f}x")
    return results


def child_args(args) -> list:
    flags = ["--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--threads", str(args.threads)]
    return flags + [f"--{name}" for name in ("compile", "baseline_compile") if getattr(args, name)]


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="autocast dtype; float32 runs without autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (compile time reported)")
    p.add_argument("--baseline_compile", action="store_true", help="torch.compile the baseline too")
    p.add_argument("--no_baseline", action="store_true", help="time model.py only")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=4,
                   help="untimed steps after the first (on a CPU the heap settles over the first few)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--model", choices=["ours", "baseline"], help=argparse.SUPPRESS)  # a child process's job
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device must be cpu or cuda, not {args.device}")
    if args.steps < 1:
        raise SystemExit("error: --steps must be at least 1")
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise SystemExit("error: this GPU has no bfloat16; use --dtype float16")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # so get_device_name() and the FLOP peak describe this GPU
        torch.set_float32_matmul_precision("high")  # TF32 matmuls, as train.py sets on CUDA
        name = torch.cuda.get_device_name()
        print(f"device: {name}, peak {runtime.peak_flops_for(name) / 1e12:.0f} TFLOPS (bf16 dense) "
              "assumed for MFU")
    if args.model:  # a child started by bench_config: time one model, report as one JSON line
        print(json.dumps(time_model(args.config, args.model, args, device, dtype)))
        return
    print(f"torch {torch.__version__}")
    for name in CONFIGS if args.config == "all" else [args.config]:
        bench_config(name, args, device, dtype)


if __name__ == "__main__":
    main()
