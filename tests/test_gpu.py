"""The CUDA paths: flash attention, the fused attention kernel of each call site and dtype, bf16
autocast, fp16 with a GradScaler, fused AdamW, torch.compile, and train.py end to end on a GPU.
Skipped without a CUDA device (conftest marks them)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import tinystories
from llamatiny.corpus import make_stories, write_endoftext
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.gpu
SMALL = ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=32,
                  max_seq_len=128)


def batch(args: ModelArgs, B=4):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (B, args.max_seq_len + 1), generator=g).cuda()
    return tokens[:, :-1], tokens[:, 1:]


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("args", [GQA_260K, MHA_15M], ids=["260K-GQA", "15M-MHA"])
def test_every_attention_call_site_runs_on_a_fused_kernel(args, dtype):
    # Only the kernel each call should get is enabled, so a call it cannot take fails ("No available kernel")
    # instead of falling back to the math kernel. Half precision: flash (it takes is_causal and grouped
    # key/value heads, no mask; the prefill and the one-token decode step pass none). float32: flash has
    # no float32 and the memory-efficient kernel no grouped heads, so model.attention repeats k and v.
    # By default torch may prefer cuDNN on some GPUs where it takes the call; flash is the one guaranteed.
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


def test_kv_cache_decoding_matches_full_forward_on_cuda():
    torch.manual_seed(0)
    model = Transformer(SMALL).cuda().eval()
    x, y = batch(SMALL, B=2)
    with torch.no_grad():
        full, _ = model(x, y)
        logits, _ = model(x[:, :16], start_pos=0)
        steps = [logits[:, -1]]
        for t in range(16, 64):
            logits, _ = model(x[:, t : t + 1], start_pos=t)
            steps.append(logits[:, -1])
    assert (torch.stack(steps, 1) - full[:, 15:64]).abs().max() < 1e-3


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


def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = Transformer(SMALL).cuda()
    compiled = torch.compile(model)
    x, y = batch(SMALL)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager, _ = model(x, y)
        comp, _ = compiled(x, y)
    assert (comp.float() - eager.float()).norm() / eager.float().norm() < 2e-2


def debug_run(tmp_path, stories: int) -> list[str]:
    # the fixture corpus with its own 512-token vocabulary in tmp_path/data, and the command line that
    # trains config/train_cpu_debug.py on it on the GPU into tmp_path/out
    text = tmp_path / "stories.txt"
    write_endoftext(text, make_stories(stories, seed=5))
    tinystories.train_vocab(tmp_path / "data", 512, input=text, name="fixture")
    tinystories.prepare(tmp_path / "data", text, "fixture", vocab_size=512)
    return [sys.executable, str(ROOT / "train.py"), str(ROOT / "config" / "train_cpu_debug.py"),
            f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", "--device=cuda"]


@pytest.mark.parametrize("dtype,compile", [("bfloat16", True), ("float16", False)])
def test_train_py_on_cuda_learns_resumes_and_logs_mfu(tmp_path, dtype, compile):
    common = debug_run(tmp_path, 3000) + [f"--dtype={dtype}", f"--compile={compile}", "--eval_interval=50",
                                          "--log_interval=10"]
    for extra in (["--max_iters=100"], ["--max_iters=150", "--init_from=resume"]):
        result = subprocess.run(common + extra, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = (tmp_path / "out" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    logs = [json.loads(line) for line in lines if '"loss"' in line]
    assert logs[-1]["iter"] == 150 and logs[-1]["loss"] < logs[0]["loss"] - 2.0
    assert all(0 < m["mfu"] < 1 for m in logs[1:])


def test_batch_size_auto_finds_the_largest_micro_batch_that_fits():
    # with the GPU's memory capped at 4 GiB for this process, the 15M shape at context 256 in bf16 fits a
    # few dozen sequences: real steps find the largest one, and one more does not fit
    from llamatiny import settings
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


def test_train_py_batch_size_auto_on_cuda(tmp_path):
    command = debug_run(tmp_path, 1000) + ["--batch_size=auto", "--gradient_accumulation_steps=4",
                                           "--max_iters=20"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # the debug config's 16 x 4 sequences fit at once on any GPU: one micro-batch of 64
    assert "batch_size=auto: 64 x 1 accumulation steps = 64 sequences per iteration" in result.stdout
    config = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))["config"]
    assert (config["batch_size"], config["gradient_accumulation_steps"]) == (64, 1)
