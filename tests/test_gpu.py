"""The CUDA paths, in-process: the attention kernel of each call site and dtype, KV-cache decoding against
the full forward under the kernel SDPA picks by default, bf16 autocast, fp16 with a GradScaler, fused AdamW,
torch.compile, and train.py on a GPU. Tests marked gpu are skipped without a CUDA device (conftest); one
parametrized over the device runs its CPU half everywhere. bench/gpu_run.sh runs the gpu ones."""
import json
import sys

import pytest
import torch
from conftest import ROOT
from torch.nn.attention import SDPBackend, sdpa_kernel

import train
from llamatiny import settings
from model import ModelArgs, Transformer

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402

gpu = pytest.mark.gpu
SMALL = ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=32,
                  max_seq_len=128)
DEBUG_CONFIG = str(ROOT / "config" / "train_cpu_debug.py")


def batch(args: ModelArgs, B=4, device="cuda"):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (B, args.max_seq_len + 1), generator=g).to(device)
    return tokens[:, :-1], tokens[:, 1:]


@gpu
def test_flash_attention_runs_our_gqa_model_and_matches_float32():
    torch.manual_seed(0)
    model = Transformer(SMALL).cuda()
    x, y = batch(SMALL)
    with torch.no_grad():
        ref, _ = model(x, y)  # float32, any kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
            fast, _ = model(x, y)  # raises if flash cannot take these shapes / GQA
    rel = (fast.float() - ref).norm() / ref.norm()
    assert rel < 2e-2, rel


# a 260K-like model (grouped-query attention, 8-wide heads) and a 15M-like one (multi-head, 48-wide)
GQA_260K = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4,
                     max_seq_len=512)
MHA_15M = ModelArgs(dim=288, n_layers=2, n_heads=6, n_kv_heads=6, vocab_size=512, multiple_of=32,
                    max_seq_len=256)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("args", [GQA_260K, MHA_15M], ids=["260K-GQA", "15M-MHA"])
def test_every_attention_call_site_runs_on_a_fused_kernel(args, dtype):
    # Only the kernel each call should get is enabled, so a call it cannot take fails ("No available kernel")
    # instead of falling back to the math kernel. Half precision: flash (it takes is_causal and grouped
    # key/value heads, no mask; the prefill and the one-token decode step pass none). float32: flash has
    # no float32 and the memory-efficient kernel no grouped heads, so model.attention repeats k and v.
    # By default torch may prefer cuDNN on some GPUs where it takes the call (the next tests); flash is
    # the one every GPU since Ampere has.
    backend = SDPBackend.EFFICIENT_ATTENTION if dtype == torch.float32 else SDPBackend.FLASH_ATTENTION
    torch.manual_seed(0)
    model = Transformer(args).cuda()
    x, y = batch(args, B=2)
    with sdpa_kernel([backend]):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):  # training, as train.py
            _, loss = model(x, y)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
        model = model.to(dtype).eval()  # sampling, as sample.py
        with torch.inference_mode():
            model(x[:, :100], start_pos=0)  # prefill
            for pos in range(100, 104):  # decode
                logits, _ = model(x[:, pos : pos + 1], start_pos=pos)
            # a prompt that fills the context: a decode step, then a slide that prefills again at 0
            out = model.generate(x, 8, temperature=0.0)
    assert torch.isfinite(logits).all() and out.shape == (2, args.max_seq_len + 8)


@gpu
def test_no_call_site_takes_the_math_kernel_by_default():
    # the kernel SDPA picks with every backend allowed, as in a run: flash, cudnn or efficient, never math
    # (bench/gpu_check.py prints them)
    lines = gpu_check.report("cuda")
    assert not [line for line in lines if "=math" in line], lines


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_kv_cache_decoding_matches_the_full_forward_under_the_default_kernel(device, dtype):
    # As sample.py decodes: the weights and the cache in dtype, SDPA choosing its kernel (cuDNN on some GPUs
    # and torch versions, flash on others; on the CPU the plain path, not cpu_speedups). A prefill of 16
    # tokens, a chunk of 8 (the masked call), then one token at a time up to 64: each call's last logits,
    # and the full forward's at the same positions, against float64's. The cache may cost no more than the
    # dtype's own rounding does; a wrongly aligned mask or a kernel that mishandles a shape costs far more.
    torch.manual_seed(0)
    model = Transformer(SMALL).to(device).eval()
    x, y = batch(SMALL, B=2, device=device)
    calls = [(0, 16), (16, 24)] + [(t, t + 1) for t in range(24, 64)]
    last = [end - 1 for _, end in calls]
    with torch.inference_mode():
        exact = model.double()(x, y)[0][:, last]  # (B, calls, vocab)
        model.to(dtype)
        full = model(x, y)[0][:, last].double()
        cached = torch.stack([model(x[:, a:b], start_pos=a)[0][:, -1] for a, b in calls], 1).double()
    error = lambda logits: ((logits - exact).norm() / exact.norm()).item()
    assert error(cached) <= 3 * error(full) + 1e-6, (error(cached), error(full))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_training_with_fused_adamw_learns(dtype):
    torch.manual_seed(0)
    model = Transformer(SMALL).cuda()
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cuda")
    assert opt.defaults.get("fused"), "fused AdamW should be used on CUDA"
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    x, y = batch(SMALL)
    losses = []
    for _ in range(60):
        with torch.autocast("cuda", dtype=dtype):
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)), "non-finite loss"
    assert losses[-1] < losses[0] - 2.0


@gpu
def test_torch_compile_works_here_and_matches_eager():
    # the smoke test that decides --compile in bench/gpu_run.sh: a training step, compiled, against eager
    works, why = gpu_check.compile_smoke_test("cuda")
    assert works, why


@gpu
def test_train_py_on_cuda_learns_resumes_in_float16_and_logs_mfu(data_dir, tmp_path):
    run = [DEBUG_CONFIG, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--device=cuda",
           "--eval_interval=50", "--log_interval=10"]
    train.train(train.parse_settings(run + ["--dtype=bfloat16", "--max_iters=100"]))
    train.train(train.parse_settings(run + ["--dtype=float16", "--max_iters=150", "--init_from=resume"]))
    lines = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    logs = [r for r in map(json.loads, lines) if "loss" in r]
    assert logs[-1]["iter"] == 150 and logs[-1]["loss"] < logs[0]["loss"] - 2.0
    assert [r["iter"] for r in logs if "first_step_s" in r] == [1, 101]  # each process's first step
    assert all(0 < r["mfu"] < 1 for r in logs if "first_step_s" not in r)


@gpu
def test_batch_size_auto_finds_the_largest_micro_batch_that_fits():
    # with the GPU's memory capped at 4 GiB for this process, the 15M shape at context 256 in bf16 fits a
    # few dozen sequences: real steps find the largest one, and one more does not fit
    args = ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=32000, multiple_of=32, max_seq_len=256)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(4 * 2**30 / total)
    try:
        largest, how = settings.largest_batch(args, 1024, "cuda", "bfloat16")
        assert how == "measured on the GPU" and 1 < largest < 1024
        assert settings.step_fits(args, largest, "cuda", "bfloat16")
        assert not settings.step_fits(args, largest + 1, "cuda", "bfloat16")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


@gpu
def test_train_py_batch_size_auto_on_cuda(data_dir, tmp_path, capsys):
    train.train(train.parse_settings([DEBUG_CONFIG, f"--data_dir={data_dir}", f"--out_dir={tmp_path}",
                                      "--device=cuda", "--batch_size=auto", "--gradient_accumulation_steps=4",
                                      "--max_iters=20"]))
    # the debug config's 16 x 4 sequences fit at once on any GPU: one micro-batch of 64
    printed = capsys.readouterr().out
    assert "batch_size=auto: 64 x 1 accumulation steps = 64 sequences per iteration" in printed
    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))["config"]
    assert (config["batch_size"], config["gradient_accumulation_steps"]) == (64, 1)
