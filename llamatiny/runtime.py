"""
The runtime every script shares: which device and dtype to use, the autocast context, seeding, the
GPU peak table for MFU, and the one-line form of an error. train.py, sample.py, eval.py and export.py
all ask here, so they give the same answer on the same machine.
"""
import os
import random
from contextlib import nullcontext

import numpy as np
import torch

from configurator import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# bf16 dense tensor-core peaks in FLOP/s, for MFU; matched against torch.cuda.get_device_name(),
# most specific names first ("H100 PCIe" before "H100")
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "H800": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,  # after A100 and A10G, which contain its name
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16; no bf16
    "T4": 65e12,  # fp16; no bf16
}


def print0(*args, **kwargs):
    # only rank 0 talks under torchrun
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def first_line(e: BaseException) -> str:
    # torch and sentencepiece write messages over many lines; a user needs the first
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def cuda_has_bf16() -> bool:
    # native bfloat16 only (Ampere and newer): emulated bf16 on a V100 or T4 is slow or fails under autocast
    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation, and reports native support only
        return torch.cuda.is_bf16_supported()


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda', else 'mps', else 'cpu'; anything else is checked against the machine."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:  # torch lists every device type it knows, over a long line
        raise ConfigError(f"--device={name} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device={name}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={name} but no CUDA GPU is visible; use --device=cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device={name} but there are {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not mps_available():
        raise ConfigError(f"--device={name} but MPS is not available; use --device=cpu (or auto)")
    return name


def resolve_dtype(name: str, device: str) -> str:
    """'auto' -> bfloat16 on a GPU that has it natively, float16 on an older GPU, float32 elsewhere."""
    if name == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if cuda_has_bf16() else "float16"
        return "float32"
    if name not in DTYPES:
        raise ConfigError(f"--dtype={name}: choose auto, {', '.join(DTYPES)}")
    if name == "bfloat16" and device.startswith("cuda") and not cuda_has_bf16():
        raise ConfigError("this GPU has no native bfloat16; use --dtype=float16 (or auto)")
    return name


def autocast(device: str, dtype: str):
    # mixed precision: matmuls in dtype, weights and the optimizer in float32
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device.split(":")[0], dtype=DTYPES[dtype])


def cpu_threads(setting: int | None) -> tuple[int, str]:
    """torch's CPU threads for a setting, and why, for the start-up line: N as set; for None, all the cores
    on an idle machine and half of them (at least one) on a busy one, unless OMP_NUM_THREADS says otherwise
    (torchrun sets it). Busy: a load average of half a core or more over the last minute. With every core
    taken, any other job on the machine stalls the threads that wait for each other at each small op, and
    a step can take ten times as long; alone, every core makes a step faster (figures: bench/README.md)."""
    if setting:
        return setting, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load < 0.5:
        return cores, "all cores, the machine is idle; --threads=N leaves room for other jobs"
    return max(1, cores // 2), (f"half the cores: the load average {load:.1f} says other jobs run, and they "
                                f"would stall every thread; --threads={cores} takes them all")


def use_cpu_threads(setting: int | None) -> str:
    """Sets torch's CPU threads as cpu_threads(setting) chooses them; returns what a command's start-up line
    says of them (why, when the rule chose)."""
    threads, why = cpu_threads(setting)
    torch.set_num_threads(threads)
    return f"{threads} CPU thread(s)" + ("" if setting else f" ({why})")


def cpu_has_bf16() -> bool:
    # AVX512-BF16 or AMX (Linux's flags): CPU bfloat16 autocast runs its matmuls natively, faster than float32
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_flops_for(device_name: str) -> float | None:
    """The bf16 peak of a GPU named like torch.cuda.get_device_name(), or None when it is not in the table."""
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in device_name.lower():
            return flops
    return None
