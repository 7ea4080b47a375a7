import glob
import re

import pytest
import torch
from conftest import ROOT

import train
from configurator import ConfigError, parse_config
from llamatiny import runtime, settings
from model import ModelArgs, Transformer


def test_resolve_config_fills_in_the_derived_values():
    c = settings.resolve_config(train.default_config() | {"learning_rate": 6e-4, "max_iters": 500,
                                                          "warmup_iters": 50})
    assert c["min_lr"] == pytest.approx(6e-5)
    assert settings.settle_run_length(c, set(), tokens_per_epoch=10**6)["lr_decay_iters"] == 500
    assert c["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert c["dtype"] == "float32"
    # explicit values win; None defaults can be overridden from the command line
    c = settings.resolve_config(parse_config(train.default_config(), ["--min_lr=0", "--lr_decay_iters=3000"]))
    assert c["min_lr"] == 0 and c["lr_decay_iters"] == 3000


@pytest.mark.parametrize("override, message", [
    ({"init_from": "resum"},
     "init_from='resum' is not 'scratch', 'resume', 'auto' or an existing checkpoint"),
    ({"dtype": "fp16"}, "dtype='fp16'"),
    ({"device": "tpu"}, "--device=tpu"),
    ({"batch_size": 0}, "batch_size=0 must be at least 1"),
    ({"warmup_iters": 500, "lr_decay_iters": 100}, "lr_decay_iters=100 is shorter than warmup_iters=500"),
    ({"dim": 288, "n_heads": 5}, "dim=288 is not divisible by n_heads=5"),
])
def test_resolve_config_rejects_bad_values(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        settings.resolve_config(train.default_config() | override)


def test_accumulation_is_global_and_must_divide_by_the_world_size():
    assert settings.split_accumulation(8, 4) == 2 and settings.split_accumulation(4, 1) == 4
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=3 must be divisible by .* \(2\)"):
        settings.split_accumulation(3, 2)


def test_peak_flops():
    assert settings.resolve_peak_flops(1e12, "cuda") == 1e12
    assert settings.resolve_peak_flops("H100", "cpu") == 989e12
    assert settings.resolve_peak_flops("nvidia h100 pcie", "cpu") == 756e12
    assert settings.resolve_peak_flops(None, "cpu") is None  # no MFU on a CPU
    with pytest.raises(ConfigError, match="unknown GPU"):
        settings.resolve_peak_flops("abacus", "cpu")


def test_shipped_configs_reproduce_the_reference_shapes():
    expected = {"260k": (260_032, 65_536), "15m": (15_191_712, 131_072), "42m": (41_689_600, 131_072),
                "110m": (109_529_856, 131_072)}
    for name, (params, tokens_per_iter) in expected.items():
        path = ROOT / "config" / f"train_{name}.py"
        c = settings.resolve_config(parse_config(train.default_config(), [str(path)]))
        with torch.device("meta"):  # shapes only, no memory
            model = Transformer(ModelArgs.from_dict(c))
        assert model.num_params() == params, name
        assert c["batch_size"] * c["max_seq_len"] * c["gradient_accumulation_steps"] == tokens_per_iter, name
        assert "val loss" in path.read_text(encoding="utf-8")
    debug = settings.resolve_config(parse_config(train.default_config(),
                                                 [str(ROOT / "config" / "train_cpu_debug.py")]))
    assert debug["dataset"] == "fixture" and debug["vocab_size"] == 512 and debug["device"] == "cpu"
    assert len(glob.glob(str(ROOT / "config" / "*.py"))) >= 5


def test_log_interval_defaults_to_fewer_host_syncs_on_a_gpu(monkeypatch):
    assert settings.resolve_config(train.default_config() | {"device": "cpu"})["log_interval"] == 1
    monkeypatch.setattr(runtime, "resolve_device", lambda name: "cuda")
    monkeypatch.setattr(runtime, "resolve_dtype", lambda name, device: "bfloat16")
    assert settings.resolve_config(train.default_config())["log_interval"] == 10
    assert settings.resolve_config(train.default_config() | {"log_interval": 1})["log_interval"] == 1


def test_max_tokens_and_max_epochs_set_max_iters():
    c = settings.resolve_config(train.default_config() | {"batch_size": 4, "gradient_accumulation_steps": 2,
                                                       "max_seq_len": 128, "max_tokens": 10_000})
    settled = settings.settle_run_length(c, {"max_tokens"}, tokens_per_epoch=5_000)
    assert settled["max_iters"] == 10  # ceil(10000 / 1024)
    epochs = c | {"max_tokens": None, "max_epochs": 1.5}
    settled = settings.settle_run_length(epochs, {"max_epochs"}, tokens_per_epoch=5_000)
    assert settled["max_iters"] == 8  # ceil(7500 / 1024)
    assert settled["lr_decay_iters"] == 8  # the schedule follows
    # resumed at iteration 3 after 3,000 tokens (1,000 per iteration): the rest at 1,024 per iteration
    assert settings.settle_run_length(c, set(), 5_000, iter_num=3, tokens_seen=3_000)["max_iters"] == 3 + 7
    with pytest.raises(ConfigError, match="give the run's length once: max_iters=100000 or max_tokens=10000"):
        settings.settle_run_length(c, {"max_iters", "max_tokens"}, 5_000)
    with pytest.raises(ConfigError, match="max_tokens or max_epochs"):
        settings.resolve_config(train.default_config() | {"max_tokens": 10, "max_epochs": 1.0})
    # a checkpoint's max_tokens gives way to a max_iters given on resume
    assert settings.settle_run_length(c, {"max_iters"}, 5_000)["max_tokens"] is None


def test_an_unknown_gpu_gets_no_made_up_mfu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA Future X1")
    assert settings.resolve_peak_flops(None, "cuda") is None
    out = capsys.readouterr().out
    assert "warning: no bf16 peak known for 'NVIDIA Future X1', so no MFU is shown; pass --peak_flops=" in out
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert settings.resolve_peak_flops(None, "cuda") == 989e12 and capsys.readouterr().out == ""
