"""
Which fused attention kernel scaled_dot_product_attention takes at each of the model's call sites
(training, prefill, decoding), for each dtype, on this device: the first thing to look at on a new GPU.
A "math" entry means that call site materialises every score: slow, and a bug to fix before training.

    python bench/gpu_check.py                   # CUDA when present, else CPU
    python bench/gpu_check.py --device cpu
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from model import ModelArgs, Transformer  # noqa: E402

SHAPES = {  # a 260K-like model (grouped-query, 8-wide heads) and a 15M-like one (multi-head, 48-wide)
    "260K-GQA": ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4,
                          max_seq_len=64),
    "15M-MHA": ModelArgs(dim=288, n_layers=1, n_heads=6, vocab_size=512, max_seq_len=64),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = parser.parse_args(argv).device
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print(f"# SDPA kernel per call site: {where}, torch {torch.__version__}")
    lines = report(device)
    print("\n".join(lines))
    if any("=math" in line for line in lines):
        print("warning: a call site takes the math kernel (every score in memory): see above")


if __name__ == "__main__":
    main()
