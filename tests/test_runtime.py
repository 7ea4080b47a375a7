import pytest
import torch

from configurator import ConfigError
from llamatiny import runtime


def test_peak_flops_lookup_prefers_the_most_specific_name():
    assert runtime.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert runtime.peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert runtime.peak_flops_for("NVIDIA H100 NVL") == 835e12
    assert runtime.peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert runtime.peak_flops_for("NVIDIA A10") == 125e12
    assert runtime.peak_flops_for("NVIDIA A10G") == 70e12
    assert runtime.peak_flops_for("NVIDIA L40S") == 362e12
    assert runtime.peak_flops_for("NVIDIA L4") == 121e12
    assert runtime.peak_flops_for("Some Future GPU") is None  # unknown: no made-up MFU


def test_device_and_dtype_resolution_on_a_cpu_machine():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU answers")
    assert runtime.resolve_device("cpu") == "cpu"
    assert runtime.resolve_dtype("auto", "cpu") == "float32"
    assert runtime.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    for bad in ("cuda", "cuda:1", "tpu", "gpu0"):
        with pytest.raises(ConfigError) as e:
            runtime.resolve_device(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="choose auto"):
        runtime.resolve_dtype("float8", "cpu")


def test_bf16_on_cuda_means_native_support(monkeypatch):
    # a V100 / T4 reports bf16 through emulation only: auto must pick float16 there, and
    # every script must agree (they all call resolve_dtype)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return including_emulation  # emulated only

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert runtime.resolve_dtype("auto", "cuda") == "float16"
    assert calls and calls[-1] is False
    with pytest.raises(ConfigError, match="no native bfloat16"):
        runtime.resolve_dtype("bfloat16", "cuda:0")


def test_autocast_is_a_no_op_in_float32():
    with runtime.autocast("cpu", "float32"):
        assert not torch.is_autocast_enabled("cpu")
    with runtime.autocast("cpu", "bfloat16"):
        assert torch.is_autocast_enabled("cpu")


def test_first_line():
    assert runtime.first_line(ValueError("one\ntwo")) == "one"
    assert runtime.first_line(KeyError()) == "KeyError"


def test_cpu_threads_default_to_all_cores_when_idle_and_half_when_busy(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.1, 0.2, 0.3), raising=False)
    assert runtime.cpu_threads(None)[0] == 8 and runtime.cpu_threads(3)[0] == 3
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.2, 0.2, 0.3), raising=False)
    threads, why = runtime.cpu_threads(None)
    assert threads == 4 and "1.2" in why and "--threads=8" in why  # the start-up line says how to take all
    before = torch.get_num_threads()
    try:  # what sample.py, eval.py and train.py set and say
        assert runtime.use_cpu_threads(None) == f"4 CPU thread(s) ({why})" and torch.get_num_threads() == 4
        assert runtime.use_cpu_threads(3) == "3 CPU thread(s)" and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert runtime.cpu_threads(None)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # torchrun's, or the user's: torch has already read it
    assert runtime.cpu_threads(None)[0] == torch.get_num_threads()
