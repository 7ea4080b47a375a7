"""
The preflight of a GPU machine, the first step of bench/gpu_run.sh: what the machine is (GPU, torch,
CUDA, cuDNN), which Python modules the other steps import are there, which attention kernel
scaled_dot_product_attention takes at each of the model's call sites (training, prefill, decoding) in
each dtype, and a torch.compile smoke test: a small model's training step compiled and compared with
eager. The last line, "compile: on (...)" or "compile: off (why)", decides --compile for the rest of
the run.

flash, cudnn (which newer PyTorch prefers on some GPUs) and efficient are fused kernels; a "math" entry
means that call site materialises every score: slow, and a bug to fix before training.

    python bench/gpu_check.py                   # CUDA when present, else CPU
    python bench/gpu_check.py --device cpu --skip_compile_test
"""
import argparse
import importlib.metadata
import importlib.util
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from llamatiny import runtime  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

SHAPES = {  # a 260K-like model (grouped-query, 8-wide heads) and a 15M-like one (multi-head, 48-wide)
    "260K-GQA": ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4,
                          max_seq_len=64),
    "15M-MHA": ModelArgs(dim=288, n_layers=1, n_heads=6, vocab_size=512, max_seq_len=64),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# what bench/gpu_run.sh's steps import beyond torch (their own lists are in the script)
MODULES = ("numpy", "tqdm", "sentencepiece", "pytest", "triton")


def machine(device: str) -> str:
    versions = f"python {platform.python_version()}, torch {torch.__version__}"
    if not device.startswith("cuda"):
        return f"CPU ({os.cpu_count()} cores); {versions}"
    props = torch.cuda.get_device_properties(device)
    return (f"{props.name} x {torch.cuda.device_count()}, {props.total_memory / 2**30:.0f} GiB, "
            f"compute capability {props.major}.{props.minor}; {versions}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}")


def modules() -> str:
    found, missing = [], []
    for name in MODULES:
        if importlib.util.find_spec(name) is None:
            missing.append(name)
            continue
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:  # importable, but without its metadata
            found.append(name)
    return ", ".join(found) + f"; missing: {', '.join(missing) or 'none'}"


def call_sites(args: ModelArgs, dtype: torch.dtype, device: str) -> dict:
    """{call site: the keyword arguments SDPA got there}, from one training step and one generation."""
    calls, original = [], F.scaled_dot_product_attention

    def recording(query, key, value, **kw):
        calls.append(dict(query=query, key=key, value=value, **kw))
        return original(query, key, value, **kw)

    F.scaled_dot_product_attention = recording
    try:
        torch.manual_seed(0)
        model = Transformer(args).to(device)
        tokens = torch.randint(0, args.vocab_size, (2, args.max_seq_len), device=device)
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            model(tokens, tokens)[1].backward()
        training = calls[0]
        calls.clear()
        model.eval().to(dtype)
        model.generate(tokens[:, :8], 2, temperature=0.0)
        return {"training": training, "prefill": calls[0], "decode": calls[-1]}
    finally:
        F.scaled_dot_product_attention = original


def backend(call: dict) -> str:
    return SDPBackend(torch._fused_sdp_choice(**call)).name.lower().replace("_attention", "")


def report(device: str) -> list[str]:
    # the plain model, without the CPU kernels: the path every GPU takes
    lines = []
    for name, args in SHAPES.items():
        for dtype_name, dtype in DTYPES.items():
            if dtype == torch.float16 and device == "cpu":
                continue  # CPU autocast in float16 is not what anyone trains with
            sites = call_sites(args, dtype, device)
            lines.append(f"{name:9} {dtype_name:9} "
                         + "  ".join(f"{site}={backend(c)}" for site, c in sites.items()))
    return lines


def compile_smoke_test(device: str) -> tuple[bool, str]:
    """Compiles a 2-layer model's training step, forward and backward, in the dtype train.py picks here,
    and compares its loss with eager: (whether compile can be used, why). Triton builds its launchers
    with a C compiler and Python's headers at this point, so an image without them fails here."""
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16,
                     max_seq_len=64)
    model = Transformer(args).to(device)
    x = torch.randint(0, args.vocab_size, (4, args.max_seq_len), device=device)
    y = torch.randint(0, args.vocab_size, (4, args.max_seq_len), device=device)
    dtype = runtime.resolve_dtype("auto", device)
    start = time.perf_counter()
    try:
        with runtime.autocast(device, dtype):
            _, loss = torch.compile(model)(x, y)
        loss.backward()
        compiled = loss.item()  # waits for the GPU
    except Exception as e:  # whatever stops it (no compiler, no Python.h, a Triton error) turns compile off
        return False, f"torch.compile failed: {type(e).__name__}: {runtime.first_line(e)}"
    seconds = time.perf_counter() - start
    with torch.no_grad(), runtime.autocast(device, dtype):
        eager = model(x, y)[1].item()
    if not abs(compiled - eager) <= 1e-2 * abs(eager):
        return False, f"the compiled model's loss {compiled:.4f} differs from eager's {eager:.4f}"
    return True, (f"a 2-layer model's {dtype} training step compiled in {seconds:.1f} s; "
                  f"its loss {compiled:.4f} matches eager's {eager:.4f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip_compile_test", action="store_true",
                        help="compile off without trying it (a dry run on a CPU, where it takes minutes)")
    args = parser.parse_args(argv)
    print(f"# {machine(args.device)}")
    print(f"modules: {modules()}")
    print("SDPA kernel per call site (flash, cudnn, efficient: fused; math: every score in memory):")
    lines = report(args.device)
    print("\n".join(lines))
    if any("=math" in line for line in lines):
        print("warning: a call site takes the math kernel (every score in memory): see above")
    works, why = (False, "the smoke test was skipped") if args.skip_compile_test else \
        compile_smoke_test(args.device)
    print(f"compile: {'on' if works else 'off'} ({why})")


if __name__ == "__main__":
    main()
