import glob
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_train import read_metrics

import train
from configurator import ConfigError, parse_config
from llamatiny import runtime, settings
from model import ModelArgs, Transformer


def test_resolve_config_fills_in_the_derived_values():
    c = settings.resolve_config(train.default_config() | {"learning_rate": 6e-4, "max_iters": 500,
                                                          "warmup_iters": 50})
    assert c["min_lr"] == pytest.approx(6e-5)
    assert settings.settle_run_length(c, tokens_per_epoch=10**6)["lr_decay_iters"] == 500
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
    settled = settings.settle_run_length(c, tokens_per_epoch=5_000)
    assert settled["max_iters"] == 10  # ceil(10000 / 1024)
    epochs = c | {"max_tokens": None, "max_epochs": 1.5}
    settled = settings.settle_run_length(epochs, tokens_per_epoch=5_000)
    assert settled["max_iters"] == 8  # ceil(7500 / 1024)
    assert settled["lr_decay_iters"] == 8  # the schedule follows
    # resumed at iteration 3 after 3,000 tokens (1,000 per iteration): the rest at 1,024 per iteration
    assert settings.settle_run_length(c, 5_000, iter_num=3, tokens_seen=3_000)["max_iters"] == 3 + 7
    with pytest.raises(ConfigError, match=re.escape("give the run's length once: max_tokens=10000 (command "
                                                    "line) or max_iters=10 (command line)")):
        settings.resolve_config(train.parse_settings(["--max_tokens=1e4", "--max_iters=10"]))
    with pytest.raises(ConfigError, match="give the run's length once: max_tokens=10 or max_epochs=1.0"):
        settings.resolve_config(train.default_config() | {"max_tokens": 10, "max_epochs": 1.0})


def test_an_unknown_gpu_gets_no_made_up_mfu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA Future X1")
    assert settings.resolve_peak_flops(None, "cuda") is None
    out = capsys.readouterr().out
    assert "warning: no bf16 peak known for 'NVIDIA Future X1', so no MFU is shown; pass --peak_flops=" in out
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert settings.resolve_peak_flops(None, "cuda") == 989e12 and capsys.readouterr().out == ""


# ------------------------------------------------------------------------- journeys: a run, then its resume

DEBUG = str(ROOT / "config" / "train_cpu_debug.py")
# a first run as a user shrinks the debug config: their own shape, batch and schedule on the command line
FIRST = ["--dim=32", "--n_layers=1", "--n_heads=2", "--n_kv_heads=1", "--max_seq_len=32", "--batch_size=4",
         "--warmup_iters=5", "--max_iters=20", "--eval_interval=10", "--eval_iters=2", "--log_interval=1"]
TOKENS_PER_ITER = 4 * 32  # the first run's batch x context (the config's gradient_accumulation_steps=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: one thread is fastest on a shared CPU (as test_train's subprocesses)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_and_say(capsys, argv) -> tuple[dict, str]:
    # train.py in this process: its result and what it printed
    result = train.train(train.parse_settings(argv))
    return result, capsys.readouterr().out


def logged(out) -> tuple[dict, list, dict]:
    # {iteration (0-based, as get_lr counts): the lr it trained at}, the iterations evaluated, and
    # {iteration: tokens trained on after it}
    logs, evals = read_metrics(out)
    tokens = {r["iter"]: r["tokens"] for r in logs}
    return {r["iter"] - 1: r["lr"] for r in logs}, [r["iter"] for r in evals], tokens


@pytest.fixture(scope="module")
def first_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("first_run") / "out"
    train.train(train.parse_settings([DEBUG, *FIRST, f"--data_dir={data_dir}", f"--out_dir={out}"]))
    return out


def resumed_copy(first_run, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    return out


def test_a_config_file_does_not_change_a_resumed_run(first_run, data_dir, tmp_path, capsys):
    # the README's resume line after a run with overrides: the config file's batch, shape and warmup differ
    out = resumed_copy(first_run, tmp_path)
    result, said = train_and_say(capsys, [DEBUG, "--init_from=resume", "--max_iters=30", f"--out_dir={out}",
                                          f"--data_dir={data_dir}"])
    assert result["iter_num"] == 30
    kept = next(line for line in said.splitlines() if line.startswith("note: kept the checkpoint's"))
    for setting in (f"batch_size=4 ({DEBUG} says 16)", f"warmup_iters=5 ({DEBUG} says 30)",
                    f"dim=32 ({DEBUG} says 64)", f"eval_iters=2 ({DEBUG} says 10)"):
        assert setting in kept, kept
    assert "note: changed on resume: max_iters 20 -> 30" in said
    lr, evals, tokens = logged(out)
    assert sorted(lr) == list(range(30)) and evals == [0, 10, 20, 30]
    # 4 x 32 tokens per iteration, not the config file's 16 x 128
    assert [tokens[i + 1] - tokens[i] for i in range(20, 30)] == [TOKENS_PER_ITER] * 10
    assert [lr[i] for i in range(20, 30)] == pytest.approx([2e-4] * 10)  # min_lr: the cosine ended at 20
    assert torch.load(out / "ckpt.pt", weights_only=False)["model_args"]["dim"] == 32


def test_resume_without_the_config_file_keeps_what_it_set(first_run, tmp_path, capsys):
    # only out_dir: the data folder, evals and log interval the first run used (partly from its config file)
    out = resumed_copy(first_run, tmp_path)
    result, said = train_and_say(capsys, ["--init_from=resume", f"--out_dir={out}", "--max_iters=40"])
    assert result["iter_num"] == 40
    lr, evals, tokens = logged(out)
    assert sorted(lr) == list(range(40)) and evals == [0, 10, 20, 30, 40]
    used = torch.load(out / "ckpt.pt", weights_only=False)["config"]
    assert (used["eval_iters"], used["eval_interval"], used["checkpoint_interval"]) == (2, 10, 10)
    assert (used["learning_rate"], used["beta2"], used["batch_size"]) == (2e-3, 0.99, 4)  # the config file's


def test_resume_with_lr_decay_iters_stretches_the_runs_own_schedule(first_run, tmp_path, capsys):
    # the README's "stretch it": checked against the run's warmup (5), not the default's (1000)
    out = resumed_copy(first_run, tmp_path)
    train_and_say(capsys, ["--init_from=resume", f"--out_dir={out}", "--max_iters=30", "--lr_decay_iters=30"])
    lr, _, _ = logged(out)
    assert [lr[i] for i in range(20, 30)] == pytest.approx([train.get_lr(i, 2e-3, 5, 30, 2e-4)
                                                            for i in range(20, 30)])
    assert all(a > b > 2e-4 for a, b in zip([lr[i] for i in range(20, 29)], [lr[i] for i in range(21, 30)]))


def test_resume_with_another_learning_rate_derives_min_lr_again(first_run, tmp_path, capsys):
    out = resumed_copy(first_run, tmp_path)
    train_and_say(capsys, ["--init_from=resume", f"--out_dir={out}", "--max_iters=24",
                           "--learning_rate=1e-4"])
    lr, _, _ = logged(out)
    assert [lr[i] for i in range(20, 24)] == pytest.approx([1e-5] * 4)  # min_lr = learning_rate / 10
    # a checkpoint from before the settings were kept as given holds only the derived min_lr (2e-4): the
    # rule of a fresh run holds, named with where each value came from
    out = resumed_copy(first_run, tmp_path / "old")
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    del ckpt["as_given"]
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(ConfigError, match=re.escape("min_lr=0.0002 (the checkpoint's) is above "
                                                    "learning_rate=0.0001 (command line)")):
        train.train(train.parse_settings(["--init_from=resume", f"--out_dir={out}", "--learning_rate=1e-4"]))
    result, _ = train_and_say(capsys, ["--init_from=resume", f"--out_dir={out}", "--max_iters=22"])
    assert result["iter_num"] == 22  # and it still resumes as it was


def test_a_decay_shorter_than_the_runs_warmup_is_refused_on_resume(first_run, tmp_path):
    out = resumed_copy(first_run, tmp_path)
    with pytest.raises(ConfigError, match=re.escape("lr_decay_iters=3 (command line) is shorter than "
                                                    "warmup_iters=5 (the checkpoint's)")):
        train.train(train.parse_settings(["--init_from=resume", f"--out_dir={out}", "--lr_decay_iters=3",
                                          "--max_iters=30"]))


def test_a_finished_warmup_does_not_start_again_on_resume(first_run, tmp_path):
    out = resumed_copy(first_run, tmp_path)
    with pytest.raises(ConfigError, match=re.escape("warmup_iters=25 (command line) would warm up again: "
                                                    "the run is at iteration 20, past its warmup of 5")):
        train.train(train.parse_settings(["--init_from=resume", f"--out_dir={out}", "--warmup_iters=25",
                                          "--max_iters=30", "--lr_decay_iters=30"]))


def test_training_longer_after_the_cosine_reached_zero_still_trains(data_dir, tmp_path, capsys):
    # the reference configs decay to min_lr=0: "train longer" must not add iterations at a learning rate of 0
    out = tmp_path / "out"
    train_and_say(capsys, [DEBUG, *FIRST, "--min_lr=0", f"--data_dir={data_dir}", f"--out_dir={out}"])
    result, said = train_and_say(capsys, [DEBUG, "--init_from=resume", "--max_iters=30", f"--out_dir={out}"])
    assert result["iter_num"] == 30
    assert "--lr_decay_iters=20 with a --min_lr above 0 keeps the old end" in said
    lr, _, _ = logged(out)
    assert [lr[i] for i in range(20, 30)] == pytest.approx([train.get_lr(i, 2e-3, 5, 30, 0.0)
                                                            for i in range(20, 30)])
    assert min(lr[i] for i in range(20, 30)) > 0
    # typed, an end before the run's is the user's choice: it trains, and says what it costs
    result, said = train_and_say(capsys, ["--init_from=resume", f"--out_dir={out}", "--max_iters=34",
                                          "--lr_decay_iters=30"])
    assert "the last 4 iterations train at a learning rate of 0" in said
    assert [logged(out)[0][i] for i in range(30, 34)] == [0.0] * 4


def test_a_config_file_edited_between_the_run_and_its_resume(data_dir, tmp_path, capsys):
    mine = tmp_path / "mine.py"
    shutil.copy(DEBUG, mine)
    out = tmp_path / "out"
    train_and_say(capsys, [str(mine), *FIRST, f"--data_dir={data_dir}", f"--out_dir={out}"])
    text = mine.read_text(encoding="utf-8")
    mine.write_text(text.replace("batch_size = 16", "batch_size = 8").replace("learning_rate = 2e-3",
                                                                                "learning_rate = 1e-3"))
    _, said = train_and_say(capsys, [str(mine), "--init_from=resume", "--max_iters=24", f"--out_dir={out}"])
    assert f"learning_rate=0.002 ({mine} says 0.001)" in said
    lr, _, tokens = logged(out)
    assert [tokens[i + 1] - tokens[i] for i in range(20, 24)] == [TOKENS_PER_ITER] * 4
    assert [lr[i] for i in range(20, 24)] == pytest.approx([2e-4] * 4)


def test_a_budget_replaces_the_config_files_max_iters_and_the_checkpoints(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    first = [a for a in FIRST if not a.startswith("--max_iters")]
    result, said = train_and_say(capsys, [DEBUG, *first, "--max_tokens=1280", f"--data_dir={data_dir}",
                                          f"--out_dir={out}"])
    assert result["iter_num"] == 10  # 1,280 tokens of 128, not the config file's 600 iterations
    per_epoch = int(re.search(r"\(([\d,]+) training tokens per epoch\)", said)[1].replace(",", ""))
    # a max_tokens run resumed with --max_epochs: that is the length now, max_tokens is cleared
    epochs = 3000 / per_epoch
    result, said = train_and_say(capsys, ["--init_from=resume", f"--out_dir={out}", f"--max_epochs={epochs}"])
    _, _, tokens = logged(out)
    assert tokens[result["iter_num"]] >= epochs * per_epoch > tokens[result["iter_num"]] - TOKENS_PER_ITER
    assert torch.load(out / "ckpt.pt", weights_only=False)["config"]["max_tokens"] is None
    # and then with --max_tokens
    result, _ = train_and_say(capsys, ["--init_from=resume", f"--out_dir={out}", "--max_tokens=3500"])
    _, _, tokens = logged(out)
    assert tokens[result["iter_num"]] >= 3500 > tokens[result["iter_num"]] - TOKENS_PER_ITER


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "config" / "*.py"))))
def test_every_shipped_config_takes_a_budget_from_the_command_line(path):
    for budget, tokens in (("--max_epochs=2", 2 * 10**9), ("--max_tokens=5e8", 5 * 10**8)):
        c = settings.resolve_config(train.parse_settings([path, budget, "--device=cpu"]))
        c = settings.settle_run_length(c, tokens_per_epoch=10**9)
        per_iter = c["batch_size"] * c["gradient_accumulation_steps"] * c["max_seq_len"]
        assert c["max_iters"] * per_iter >= tokens > (c["max_iters"] - 1) * per_iter, (path, budget)
        assert c["lr_decay_iters"] == c["max_iters"]
    with pytest.raises(ConfigError, match="give the run's length once"):
        settings.resolve_config(train.parse_settings([path, "--max_epochs=2", "--max_iters=10"]))


def test_a_run_killed_before_its_first_checkpoint_gets_one_advice(first_run, data_dir, tmp_path):
    out = resumed_copy(first_run, tmp_path)
    (out / "ckpt.pt").unlink()
    (out / "ckpt_best.pt").unlink()
    advice = []
    for more in ([], ["--init_from=resume"]):
        with pytest.raises((ConfigError, train.TrainError)) as e:
            train.train(train.parse_settings([DEBUG, *FIRST, f"--data_dir={data_dir}", f"--out_dir={out}",
                                              *more]))
        advice.append(str(e.value))
    for message in advice:
        assert "--overwrite=True" in message and "before its first checkpoint" in message, message
        assert "--init_from=resume continues" not in message and "train from scratch" not in message


def test_compile_from_a_config_file_is_off_on_a_cpu(capsys):
    path = str(ROOT / "config" / "train_260k.py")
    c = settings.resolve_config(train.parse_settings([path, "--device=cpu"]))
    assert c["compile"] is False
    assert f"note: compile=True ({path}) is off on a CPU" in capsys.readouterr().out
    c = settings.resolve_config(train.parse_settings([path, "--device=cpu", "--compile=True"]))
    assert c["compile"] is True
    assert "note: compile=True on a CPU: the first step waits for compiling" in capsys.readouterr().out


def test_errors_name_where_each_value_came_from():
    with pytest.raises(ConfigError, match=re.escape(f"lr_decay_iters=10 (command line) is shorter than "
                                                    f"warmup_iters=30 ({DEBUG})")):
        settings.resolve_config(train.parse_settings([DEBUG, "--lr_decay_iters=10"]))
    with pytest.raises(ConfigError, match=re.escape("min_lr=0.01 (command line) is above "
                                                    f"learning_rate=0.002 ({DEBUG})")):
        settings.resolve_config(train.parse_settings([DEBUG, "--min_lr=1e-2"]))


@pytest.mark.parametrize("theirs, ours", [("n_embd", "dim"), ("n_layer", "n_layers"), ("n_head", "n_heads"),
                                          ("block_size", "max_seq_len")])
def test_nanogpts_names_point_at_ours(theirs, ours):
    with pytest.raises(ConfigError, match=re.escape(f"did you mean '{ours}'?")):
        train.parse_settings([f"--{theirs}=64"])


def test_always_save_checkpoint_is_accepted_with_a_note(tmp_path, capsys):
    path = tmp_path / "nano.py"
    path.write_text("always_save_checkpoint = False\nbatch_size = 8\n", encoding="utf-8")
    for argv in ([str(path)], ["--always_save_checkpoint=True"]):
        config = train.parse_settings(argv)
        assert "always_save_checkpoint" not in config
        settings.resolve_config(config)
        said = capsys.readouterr().out
        assert "note: always_save_checkpoint" in said
        assert "ckpt.pt is written every checkpoint_interval" in said
