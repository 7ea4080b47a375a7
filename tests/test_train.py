import contextlib
import dataclasses
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_main
from test_cpu_kernels import REALLOCATION_FAULTS

import train
from configurator import parse_config
from llamatiny import data, settings
from llamatiny.checkpoint import from_checkpoint, read_llama2c_header, write_llama2c, write_tokenizer_bin
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "train.py")
CHECKPOINT_KEYS = {"model", "model_args", "optimizer", "scaler", "config", "as_given", "iter_num",
                   "tokens_seen", "best_val_loss", "loader_state", "rng_state", "tokenizer", "elapsed_s"}
# a model small enough for ~10 ms iterations on one CPU thread
TINY = ["--dataset=fixture", "--vocab_source=custom", "--vocab_size=512", "--dim=32", "--n_layers=2",
        "--n_heads=4", "--n_kv_heads=2", "--multiple_of=16", "--max_seq_len=32", "--batch_size=8",
        "--gradient_accumulation_steps=2", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2",
        "--learning_rate=3e-3", "--device=cpu", "--compile=False"]
LOG_LINE = re.compile(r"^iter \d+ \| loss \d+\.\d{4} \| lr \d\.\d\de[+-]\d\d \| grad norm \d+\.\d{3} \| "
                      r"\d+\.\d ms/iter \| [\d,]+ tokens/s \| MFU - \| \d+s elapsed, \d+s left$")
FIRST_LOG_LINE = re.compile(r"^iter 1 \| loss \d+\.\d{4} \| lr \d\.\d\de[+-]\d\d \| grad norm \d+\.\d{3} \| "
                            r"first step \d+\.\d s \| \d+s elapsed$")


# ----------------------------------------------------------------------------- helpers


def run_train(args, data_dir, out_dir, torchrun=0, process=False) -> subprocess.CompletedProcess:
    # train.py's main() in this process; in a process of its own where that is what is tested (process=True,
    # torchrun). Tiny models: one thread is fastest on a shared CPU
    argv = TINY + [f"--data_dir={data_dir}", f"--out_dir={out_dir}"] + list(args)
    if not (torchrun or process):
        return run_main(train.main, ["--threads=1"] + argv)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    return subprocess.run(launcher + [TRAIN] + argv, capture_output=True, text=True, timeout=240, env=env,
                          cwd=out_dir.parent)


def ok(result) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_metrics(out_dir) -> tuple[list[dict], list[dict]]:
    with open(out_dir / "metrics.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def assert_same_losses(a, b, evals=True):
    """Two runs' training losses and gradient norms, iteration by iteration (and their evals, unless the runs
    have different numbers of processes, whose evals average different numbers of batches)."""
    (logs_a, evals_a), (logs_b, evals_b) = read_metrics(a), read_metrics(b)
    assert [r["iter"] for r in logs_a] == [r["iter"] for r in logs_b]
    compared = [("loss", logs_a, logs_b), ("grad_norm", logs_a, logs_b)]
    if evals:
        assert [r["iter"] for r in evals_a] == [r["iter"] for r in evals_b]
        compared.append(("val_loss", evals_a, evals_b))
    for key, first, second in compared:
        assert [r[key] for r in first] == pytest.approx([r[key] for r in second], rel=1e-4, abs=1e-6), key


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in last, last
    return last


def main_error(argv) -> str:
    # train.main() in this process: the one line it exits with
    err = io.StringIO()
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(err):
        train.main(argv)
    message = err.getvalue()
    assert e.value.code == 1 and message.startswith("error: ") and message.count("\n") == 1, message
    return message.rstrip("\n")


def straight_and_resumed(args, iters, data_dir, tmp_path) -> tuple[Path, Path]:
    # the same run twice: straight through, and stopped halfway then resumed as a user resumes, with only
    # the new length (the run's own settings come from its checkpoint); returns both out_dirs
    full, part = tmp_path / "full", tmp_path / "part"
    ok(run_train(args + [f"--max_iters={iters}"], data_dir, full))
    ok(run_train(args + [f"--max_iters={iters // 2}"], data_dir, part))
    ok(run_train([f"--max_iters={iters}", "--init_from=resume"], data_dir, part))
    return full, part


@pytest.fixture(scope="session")
def short_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("short_run") / "out"
    result = ok(run_train(["--max_iters=30", "--eval_interval=15"], data_dir, out))
    return out, result


# ----------------------------------------------------------------------------- the schedule


def test_lr_warmup_starts_above_zero_and_reaches_the_peak():
    lr, warmup = 1e-3, 10
    assert train.get_lr(0, lr, warmup, 100, 1e-4) == pytest.approx(lr / warmup)
    assert train.get_lr(warmup - 1, lr, warmup, 100, 1e-4) == pytest.approx(lr)
    assert train.get_lr(warmup, lr, warmup, 100, 1e-4) == pytest.approx(lr)  # cosine starts at the peak
    steps = [train.get_lr(i, lr, warmup, 100, 1e-4) for i in range(warmup)]
    assert all(b > a > 0 for a, b in zip(steps, steps[1:]))


def test_lr_cosine_decays_to_min_lr_and_stays_there():
    lr, min_lr, warmup, decay = 1e-3, 1e-4, 10, 110
    assert train.get_lr(60, lr, warmup, decay, min_lr) == pytest.approx((lr + min_lr) / 2)  # half-way
    assert min_lr < train.get_lr(decay - 1, lr, warmup, decay, min_lr) < min_lr * 1.01  # last step of a run
    assert train.get_lr(decay, lr, warmup, decay, min_lr) == min_lr
    assert train.get_lr(10 * decay, lr, warmup, decay, min_lr) == min_lr
    values = [train.get_lr(i, lr, warmup, decay, min_lr) for i in range(warmup, decay + 1)]
    assert all(b <= a for a, b in zip(values, values[1:]))


def test_lr_without_warmup_and_with_decay_equal_to_warmup():
    assert train.get_lr(0, 1e-3, 0, 100, 0.0) == 1e-3
    # decay ending where warmup ends: straight to min_lr, no division by zero
    assert train.get_lr(10, 1e-3, 10, 10, 1e-5) == 1e-5


# ----------------------------------------------------------------------------- checkpoints on disk


def test_save_checkpoint_replaces_atomically(tmp_path):
    path = tmp_path / "ckpt.pt"
    train.save_checkpoint(path, {"iter_num": 1})
    train.save_checkpoint(path, {"iter_num": 2})
    assert torch.load(path)["iter_num"] == 2
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


KILLED_SAVE = """
import os, sys, time
import torch
sys.path.insert(0, {root!r})
import train

path, ready, where = sys.argv[1:]

def stall():
    open(ready, "w").close()  # tell the test we are inside save_checkpoint, then wait for SIGKILL
    time.sleep(120)

class StallWhilePickling:
    def __reduce__(self):
        stall()
        return (int, ())

if where == "before_rename":  # everything written, not yet renamed
    os.fsync = lambda fd: stall()
obj = {{"iter_num": 2, "weights": torch.randn(512, 1024)}}
if where == "mid_write":
    obj["stall"] = StallWhilePickling()
train.save_checkpoint(path, obj)
"""


@pytest.mark.parametrize("where", ["mid_write", "before_rename"])
def test_sigkill_while_saving_keeps_the_previous_checkpoint(tmp_path, where):
    path, ready = tmp_path / "ckpt.pt", tmp_path / "ready"
    train.save_checkpoint(path, {"iter_num": 1, "weights": torch.ones(3)})
    script = tmp_path / "save.py"
    script.write_text(KILLED_SAVE.format(root=str(ROOT)), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(ready), where])
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert proc.poll() is None, "the saving process ended before it was killed"
            assert time.time() < deadline, "the saving process never reached save_checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "ckpt.pt.tmp").exists()  # the interrupted write went to the temporary file ...
    old = torch.load(path)  # ... and the previous checkpoint is whole
    assert old["iter_num"] == 1 and torch.equal(old["weights"], torch.ones(3))
    train.save_checkpoint(path, {"iter_num": 3})  # and the next save goes through
    assert torch.load(path)["iter_num"] == 3 and not (tmp_path / "ckpt.pt.tmp").exists()


# ----------------------------------------------------------------------------- real runs


def test_short_run_learns_and_writes_its_outputs(short_run):
    out, result = short_run
    logs, evals = read_metrics(out)
    assert [r["iter"] for r in logs] == list(range(1, 31))
    assert set(logs[0]) == {"iter", "tokens", "loss", "lr", "grad_norm", "dt_ms", "tok_per_s", "mfu",
                            "elapsed_s", "first_step_s"}
    assert logs[0]["first_step_s"] > 0 and not any("first_step_s" in r for r in logs[1:])
    assert logs[0]["tok_per_s"] is None and all(r["tok_per_s"] > 0 for r in logs[1:])  # step 1: warm-up
    assert all(a["elapsed_s"] < b["elapsed_s"] for a, b in zip(logs, logs[1:]))
    assert set(evals[0]) == {"iter", "tokens", "train_loss", "val_loss"}
    assert [r["iter"] for r in evals] == [0, 15, 30]  # the fresh model's loss, before the first step
    assert not any("mem_gib" in r for r in logs)  # GPU memory: on a CPU, none is claimed
    assert logs[-1]["tokens"] == 30 * 2 * 8 * 32
    first, last = sum(r["loss"] for r in logs[:3]) / 3, sum(r["loss"] for r in logs[-3:]) / 3
    assert first > 5.5 and last < first - 1.0, (first, last)  # from about ln(512) = 6.2
    assert evals[0]["tokens"] == 0 and abs(evals[0]["val_loss"] - math.log(512)) < 0.05, evals[0]
    assert evals[2]["val_loss"] < evals[1]["val_loss"] < evals[0]["val_loss"]
    assert re.search(r"^eval iter 0: train loss 6\.\d{4}, val loss 6\.\d{4}$", result.stdout, re.M)

    lines = [line for line in result.stdout.splitlines() if line.startswith("iter ")]
    assert len(lines) == 30 and FIRST_LOG_LINE.match(lines[0]), lines[0]
    assert not any(" | mem " in line for line in lines)
    assert all(LOG_LINE.match(line) for line in lines[1:]), lines[1:3]
    assert re.search(r"^done: 30 iterations, 15,360 tokens in \d+s, best val loss \d\.\d{4}$", result.stdout,
                     re.M)

    model, ckpt = from_checkpoint(out / "ckpt.pt")
    assert set(ckpt) == CHECKPOINT_KEYS
    assert ckpt["iter_num"] == 30 and ckpt["tokens_seen"] == 30 * 512
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert ckpt["model_args"]["dim"] == 32 and ckpt["config"]["lr_decay_iters"] == 30
    assert ckpt["best_val_loss"] == pytest.approx(evals[2]["val_loss"])
    assert Path(ckpt["tokenizer"]).is_file() and len(ckpt["rng_state"]) == 1

    info = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert info["config"]["batch_size"] == 8 and info["torch"] == torch.__version__ and "git" in info


def test_the_first_step_of_each_process_is_logged_whatever_the_log_interval(data_dir, tmp_path, capsys):
    # on a GPU log_interval defaults to 10, and the first step (compiling) must still be seen and kept
    run = TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--log_interval=4", "--eval_interval=6"]
    train.train(train.parse_settings(run + ["--max_iters=6"]))
    train.train(train.parse_settings(run + ["--max_iters=10", "--init_from=resume"]))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iter ")]
    logs, _ = read_metrics(tmp_path)
    assert [r["iter"] for r in logs] == [1, 4, 6, 7, 8, 10]  # the resumed process's first step is 7
    # the fresh run evaluates before its first step, the resumed one does not again
    raw = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert [r["iter"] for r in map(json.loads, raw) if "val_loss" in r] == [0, 6, 10]
    assert [i for i, line in enumerate(lines) if " | first step " in line] == [0, 3]
    assert FIRST_LOG_LINE.match(lines[0]), lines[0]
    firsts = [r for r in logs if "first_step_s" in r]
    assert [r["iter"] for r in firsts] == [1, 7] and all(r["first_step_s"] > 0 for r in firsts)


@pytest.mark.slow
def test_resume_continues_exactly(data_dir, tmp_path):
    # dropout on, so the restored RNG streams matter as much as the weights, optimizer and data position
    full, part = straight_and_resumed(["--dropout=0.1", "--eval_interval=6", "--lr_decay_iters=12"], 12,
                                      data_dir, tmp_path)
    full_logs, full_evals = read_metrics(full)
    part_logs, part_evals = read_metrics(part)
    assert [r["iter"] for r in part_logs] == list(range(1, 13))  # no duplicate lines after resuming
    for a, b in zip(full_logs, part_logs):
        assert (a["iter"], a["loss"], a["grad_norm"], a["lr"], a["tokens"]) == \
               (b["iter"], b["loss"], b["grad_norm"], b["lr"], b["tokens"])
    assert full_evals == part_evals
    a, b = torch.load(full / "ckpt.pt", weights_only=False), torch.load(part / "ckpt.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mixed_precision_on_cpu_learns_and_resumes_exactly(data_dir, tmp_path, dtype):
    # the AMP code paths a GPU run takes (autocast; for float16 the GradScaler, its state in the
    # checkpoint and its unscale before clipping), exercised on CPU autocast
    full, part = straight_and_resumed([f"--dtype={dtype}", "--eval_interval=5", "--lr_decay_iters=10"], 10,
                                      data_dir, tmp_path)
    full_logs, _ = read_metrics(full)
    part_logs, _ = read_metrics(part)
    assert ([(r["loss"], r["grad_norm"]) for r in full_logs]
            == [(r["loss"], r["grad_norm"]) for r in part_logs])
    assert full_logs[-1]["loss"] < full_logs[0]["loss"] - 0.1
    assert all(r["grad_norm"] < 10 for r in full_logs)  # unscaled before clipping and logging (scale: 65536)
    ckpt = torch.load(full / "ckpt.pt", weights_only=False)
    assert ckpt["config"]["dtype"] == dtype
    assert (ckpt["scaler"].get("scale", 0) > 0) == (dtype == "float16")  # a disabled scaler saves nothing
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())  # still float32 under autocast


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(short_run, data_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(short_run[0], out)
    before = (out / "ckpt.pt").read_bytes()
    # a learning rate that truly diverges: the weights blow up within a few steps
    result = run_train(["--init_from=resume", "--max_iters=60", "--eval_interval=5", "--learning_rate=1e6",
                        "--warmup_iters=0", "--lr_decay_iters=60"], data_dir, out)
    last = assert_one_line_error(result, "at iteration", "training stopped",
                                 f"the last good checkpoint is {out / 'ckpt.pt'} (iteration 30)")
    assert re.search(r"is (nan|inf|-inf) at iteration 3\d", last), last
    assert (out / "ckpt.pt").read_bytes() == before  # untouched, and still loads
    assert from_checkpoint(out / "ckpt.pt")[1]["iter_num"] == 30


def test_eval_only_evaluates_the_checkpoint(short_run, data_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(short_run[0], out)
    result = ok(run_train(["--init_from=resume", "--eval_only=True", "--max_iters=30"], data_dir, out))
    assert re.search(r"eval iter 30: train loss \d\.\d{4}, val loss \d\.\d{4}",
                     result.stdout), result.stdout


# ----------------------------------------------------------------------------- fine-tuning: init_from=PATH


def test_finetune_from_a_llama2c_file(short_run, data_dir, tmp_path):
    # the short run's model through llama2.c's format (as the published stories*.bin), then trained on:
    # the weights carry over (the loss starts where the source model is, not at ln(512) = 6.2) and the
    # shape comes from the file, whatever the config says
    source = tmp_path / "source.bin"
    write_llama2c(source, from_checkpoint(short_run[0] / "ckpt.pt")[0])
    _, source_evals = read_metrics(short_run[0])
    out = tmp_path / "ft"
    result = ok(run_train([f"--init_from={source}", "--dim=64", "--max_iters=8", "--eval_interval=4"],
                          data_dir, out))
    # (the settings given; not hidden_dim, which the config derives from dim)
    assert f"note: the model's shape comes from {source}: dim=32 (config: 64)\n" in result.stdout
    logs, evals = read_metrics(out)
    assert [r["iter"] for r in logs] == list(range(1, 9)) and logs[0]["tokens"] == 2 * 8 * 32  # a new run
    assert abs(logs[0]["loss"] - source_evals[-1]["train_loss"]) < 0.3, (logs[0], source_evals[-1])
    # the starting point is evaluated first: the source model's loss on this data, as its own run measured it
    assert evals[0]["iter"] == 0
    assert evals[0]["val_loss"] == pytest.approx(source_evals[-1]["val_loss"], rel=1e-4)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # and training goes on from there
    assert "warning" not in result.stdout
    model, ckpt = from_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == 8 and ckpt["model_args"]["dim"] == 32 and ckpt["config"]["dim"] == 32
    assert ckpt["config"]["init_from"] == str(source)


def test_a_finetune_may_change_rope_theta_and_the_context_a_resume_may_not(short_run, data_dir, tmp_path,
                                                                            capsys):
    # a model's context extended: fine-tuned at a longer max_seq_len with a larger rope_theta, with a note
    base, long = short_run[0] / "ckpt.pt", tmp_path / "long"
    run = [*TINY, f"--data_dir={data_dir}", "--max_iters=2", "--eval_interval=2"]
    train.train(train.parse_settings(run + [f"--init_from={base}", "--max_seq_len=64", "--rope_theta=40000",
                                            f"--out_dir={long}"]))
    printed = capsys.readouterr().out
    assert f"note: training with max_seq_len=64; {base} was trained with 32\n" in printed
    assert f"note: training with rope_theta=40000; {base} was trained with 10000 (" in printed
    model, ckpt = from_checkpoint(long / "ckpt.pt")
    assert (ckpt["model_args"]["max_seq_len"], ckpt["model_args"]["rope_theta"]) == (64, 40000)
    x = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    other = Transformer(dataclasses.replace(model.args, rope_theta=10000.0))
    other.load_state_dict(model.state_dict())
    assert not torch.allclose(model(x, x)[0], other(x, x)[0])  # the positions do rotate otherwise
    # not given again, a fine-tune keeps the model's rope_theta
    again = tmp_path / "again"
    train.train(train.parse_settings(run + [f"--init_from={long / 'ckpt.pt'}", f"--out_dir={again}"]))
    assert from_checkpoint(again / "ckpt.pt")[1]["model_args"]["rope_theta"] == 40000
    # a resumed run keeps it: changing it is refused in one line
    message = main_error(run + ["--init_from=resume", "--max_iters=4", "--rope_theta=10000",
                                f"--out_dir={long}"])
    assert f"{long / 'ckpt.pt'} was trained with rope_theta=40000.0 (command line: 10000.0)" in message


def test_a_model_worse_than_uniform_on_its_new_data_is_flagged(short_run, data_dir, tmp_path):
    # a llama2.c file carries no tokenizer: one made with another vocabulary of the same size (here, the
    # short run's model with its token ids shuffled) would otherwise fine-tune silently on the wrong tokens
    model = from_checkpoint(short_run[0] / "ckpt.pt")[0]
    shuffled = torch.randperm(512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(model.tok_embeddings.weight[shuffled])
    source = tmp_path / "other_vocabulary.bin"
    write_llama2c(source, model)
    result = ok(run_train([f"--init_from={source}", "--max_iters=1", "--eval_interval=1"], data_dir,
                          tmp_path / "o"))
    assert re.search(r"warning: the model starts at val loss \d+\.\d\d, worse than guessing uniformly "
                     r"among its 512 tokens \(ln 512 = 6\.24\): the data was almost surely tokenized with "
                     r"another vocabulary than the model's", result.stdout), result.stdout


def test_finetune_vocab_mismatch_names_the_data_it_needs(data_dir, tmp_path):
    # a llama2.c file with the Llama 2 vocabulary against data in a 512-token one
    path = tmp_path / "stories.bin"
    write_llama2c(path, Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=32000,
                                              max_seq_len=32)))
    message = main_error(TINY + [f"--init_from={path}", f"--data_dir={data_dir}",
                                 f"--out_dir={tmp_path / 'o'}"])
    assert f"{path} has a 32000-token vocabulary but the data in" in message and "with 512 tokens" in message
    assert "--vocab_source=llama2 --vocab_size=32000" in message


def test_finetune_from_a_missing_or_unreadable_file(data_dir, tmp_path):
    missing = tmp_path / "stories15M.bin"
    message = main_error(TINY + [f"--init_from={missing}", f"--data_dir={data_dir}",
                                 f"--out_dir={tmp_path / 'o'}"])
    assert (f"init_from='{missing}' (command line) is not 'scratch', 'resume', 'auto' or an existing "
            "checkpoint") in message
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n", encoding="utf-8")
    message = main_error(TINY + [f"--init_from={text}", f"--data_dir={data_dir}",
                                 f"--out_dir={tmp_path / 'o'}"])
    assert f"{text} is not a checkpoint written by train.py" in message


# ----------------------------------------------------------------------------- failures: one line, exit 1


def test_bad_config_is_a_one_line_error_without_traceback(data_dir, tmp_path):
    result = run_train(["--learnig_rate=1e-3"], data_dir, tmp_path / "out", process=True)
    assert_one_line_error(result, "unknown config key 'learnig_rate'", "did you mean 'learning_rate'")


def test_no_shards_names_the_command_to_run(tmp_path):
    message = main_error(TINY + ["--dataset=tinystories", f"--data_dir={tmp_path}",
                                 f"--out_dir={tmp_path / 'o'}"])
    assert "python tinystories.py pretokenize --vocab_size 512" in message


def test_vocab_size_mismatch(data_dir, tmp_path):
    message = main_error(TINY + ["--vocab_size=1024", f"--data_dir={data_dir}",
                                 f"--out_dir={tmp_path / 'o'}"])
    assert "512-token vocabulary but vocab_size=1024" in message and "--vocab_size=512" in message


def test_resume_without_a_checkpoint(data_dir, tmp_path):
    message = main_error(TINY + ["--init_from=resume", f"--data_dir={data_dir}",
                                 f"--out_dir={tmp_path / 'o'}"])
    assert "no checkpoint at" in message and "ckpt.pt" in message


def test_resume_with_other_model_args(short_run, data_dir):
    message = main_error(TINY + ["--init_from=resume", "--dim=64", f"--data_dir={data_dir}",
                                 f"--out_dir={short_run[0]}"])
    assert "dim=32 (command line: 64)" in message


def test_resume_on_another_vocabulary(short_run, data_dir, tmp_path):
    # out_dir holds a run on other data: a different vocabulary size, or the same size from another tokenizer
    out = tmp_path / "out"
    out.mkdir()
    ckpt = torch.load(short_run[0] / "ckpt.pt", weights_only=False)
    other = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                                  vocab_size=1024, max_seq_len=32))
    trained = ckpt["config"] | {"dataset": "mine", "vocab_size": 1024}
    torch.save(ckpt | {"model": other.state_dict(), "model_args": dataclasses.asdict(other.args),
                       "config": trained}, out / "ckpt.pt")
    message = main_error(TINY + ["--init_from=resume", f"--data_dir={data_dir}", f"--out_dir={out}"])
    assert "has a 1024-token vocabulary but the data in" in message
    assert "it was trained with --dataset=mine --vocab_source=custom --vocab_size=1024" in message

    tokenizer = tmp_path / "other.model"
    tokenizer.write_bytes(b"another tokenizer")
    torch.save(ckpt | {"tokenizer": str(tokenizer)}, out / "ckpt.pt")
    message = main_error(TINY + ["--init_from=resume", f"--data_dir={data_dir}", f"--out_dir={out}"])
    assert f"trained with the tokenizer {tokenizer}" in message
    assert "the same vocabulary size, different tokens" in message

    (out / "ckpt.pt").write_bytes(b"cut short")  # a truncated copy
    message = main_error(TINY + ["--init_from=resume", f"--data_dir={data_dir}", f"--out_dir={out}"])
    assert "is not a checkpoint written by train.py" in message


@pytest.mark.parametrize("source, fragment", [("dim = (\n", ":1: syntax error"),
                                              ("dim = undefined_name\n", "NameError: name 'undefined_name'")])
def test_config_file_that_raises(data_dir, tmp_path, source, fragment):
    config = tmp_path / "broken.py"
    config.write_text(source, encoding="utf-8")
    message = main_error([str(config)] + TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}"])
    assert fragment in message


def test_cuda_out_of_memory_names_the_batch_size(monkeypatch):
    def out_of_memory(config):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train", out_of_memory)
    message = main_error(["--batch_size=64", "--gradient_accumulation_steps=4"])
    assert "batch_size=64" in message and "--batch_size=32 --gradient_accumulation_steps=8" in message


def test_help_lists_the_settings_with_what_each_is(capsys):
    train.main(["--help"])
    out = capsys.readouterr().out
    for key, default in train.default_config().items():  # every setting, with its default
        assert re.search(rf"^  {key} = {re.escape(repr(default))}(  |$)", out, re.M), key
    lines = out.splitlines()
    # the comment beside a default describes it, as do the comment lines above one without such a comment
    described = {"eval_iters": "batches per split per process at each eval",
                 "init_from": "'scratch'; 'resume': out_dir/ckpt.pt with its optimizer",
                 "n_kv_heads": "None: n_heads (plain multi-head attention)"}  # (ModelArgs' own comment)
    for key, text in described.items():
        line = next(line for line in lines if line.startswith(f"  {key} = "))
        assert line.endswith(text) or text in line, line
    # the comment lines above a setting that has its own comment are a section title
    assert lines[lines.index("I/O") + 1].startswith("  out_dir = 'out'")
    assert "system" in lines and not any(set(line) == {"-"} for line in lines)
    assert "--master_port=29500 \\\n" in out  # the docstring's line continuation, as typed


# ----------------------------------------------------------------------------- DDP and compile


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(data_dir, tmp_path):
    # gradient_accumulation_steps is global: 2 ranks x 2 micro-steps see the batches 1 process x 4 sees
    args = ["--max_iters=5", "--eval_interval=5", "--gradient_accumulation_steps=4", "--batch_size=4"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    ok(run_train(args, data_dir, single))
    result = ok(run_train(args, data_dir, ddp, torchrun=2))
    assert "2 process(es) x 2 accumulation step(s)" in result.stdout
    assert_same_losses(ddp, single, evals=False)
    ckpt = torch.load(ddp / "ckpt.pt", weights_only=False)
    assert len(ckpt["rng_state"]) == 2 and not any(k.startswith("module.") for k in ckpt["model"])


@pytest.mark.slow
def test_compiled_model_saves_plain_names(data_dir, tmp_path, monkeypatch):
    # torch.compile with the eager backend: the same wrapping (and _orig_mod. names) without a C++ compiler
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager"))
    config = parse_config(train.default_config(),
                          TINY + ["--compile=True", "--max_iters=2", "--eval_interval=2",
                                  f"--data_dir={data_dir}", f"--out_dir={tmp_path}"])
    train.train(config)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["model"] and not any("_orig_mod" in k for k in ckpt["model"])


def test_untied_head_and_weight_init_reach_the_model_and_the_checkpoint(data_dir, tmp_path, capsys):
    # one step at a negligible learning rate: the checkpoint holds the weights as they were drawn
    run = TINY + [f"--data_dir={data_dir}", "--max_iters=1", "--eval_interval=1", "--learning_rate=1e-9"]
    train.train(train.parse_settings(run + ["--tie_embeddings=False", "--weight_init=kaiming",
                                            f"--out_dir={tmp_path / 'a'}"]))
    model, ckpt = from_checkpoint(tmp_path / "a" / "ckpt.pt")
    assert ckpt["config"]["weight_init"] == "kaiming" and ckpt["model_args"]["tie_embeddings"] is False
    state = ckpt["model"]
    for name in ("tok_embeddings.weight", "output.weight", "layers.0.attention.wq.weight",
                 "layers.1.feed_forward.w2.weight"):  # fan_in 32, 32, 32 and 96
        assert state[name].std().item() == pytest.approx((2 / state[name].size(1)) ** 0.5, rel=0.1), name
    assert not torch.allclose(state["output.weight"], state["tok_embeddings.weight"], atol=0.1)
    n_params = sum(t.numel() for t in state.values())  # two matrices of 512 x 32, each counted
    assert f"model: {n_params:,} parameters (" in capsys.readouterr().out

    # a fine-tune takes the untied shape from its source; weight_init has nothing to draw
    train.train(train.parse_settings(run + [f"--init_from={tmp_path / 'a' / 'ckpt.pt'}", "--weight_init=hf",
                                            f"--out_dir={tmp_path / 'b'}"]))
    assert "note: weight_init='hf' is for a run from scratch" in capsys.readouterr().out
    tuned, _ = from_checkpoint(tmp_path / "b" / "ckpt.pt")
    assert not tuned.args.tie_embeddings and tuned.output.weight is not tuned.tok_embeddings.weight
    assert "weight_init='kaiming' (command line: 'hf')" in main_error(
        run + ["--init_from=resume", "--max_iters=2", "--weight_init=hf", f"--out_dir={tmp_path / 'a'}"])
    assert main_error(run + ["--weight_init=xavier", f"--out_dir={tmp_path / 'c'}"]) == \
        "error: weight_init='xavier' (command line) is not one of 'gpt2', 'hf', 'kaiming'"


# ----------------------------------------------------------------------------- settings: types and resume


@pytest.mark.parametrize("arg, message", [
    ("--n_kv_heads=abc", "n_kv_heads='abc' (from --n_kv_heads=abc) has the wrong type: expected int or None"),
    ("--n_kv_heads=0", "n_kv_heads=0 (command line) must be at least 1"),
    ("--hidden_dim=1.5", "hidden_dim=1.5 (from --hidden_dim=1.5) has the wrong type: expected int or None"),
    ("--hidden_dim=-4", "hidden_dim=-4 (command line) must be at least 1"),
    ("--min_lr=fast", "min_lr='fast' (from --min_lr=fast) has the wrong type: expected float or None"),
    ("--lr_decay_iters=5",
     "lr_decay_iters=5 (command line) is shorter than warmup_iters=1000 (command line); lower"),
])
def test_settings_with_none_defaults_are_checked(tmp_path, arg, message):
    assert message in main_error(["config/train_cpu_debug.py", "--warmup_iters=1000", arg,
                                  f"--out_dir={tmp_path}"])


def test_a_smoke_run_shorter_than_warmup_runs_and_says_so(data_dir, tmp_path):
    # what llama2.c and nanoGPT users type to try a config: it runs, with a warning about the schedule
    result = ok(run_train(["--max_iters=4", "--warmup_iters=1000", "--eval_interval=4"], data_dir,
                          tmp_path / "o"))
    assert ("warning: max_iters=4 ends inside warmup_iters=1000: the learning rate only climbs to "
            "1.2e-05 of 3.0e-03; pass e.g. --warmup_iters=1" in result.stdout)
    logs, _ = read_metrics(tmp_path / "o")
    assert [r["lr"] for r in logs] == pytest.approx([3e-3 * i / 1000 for i in range(1, 5)])


def test_resuming_with_more_iterations_keeps_the_schedule(data_dir, tmp_path):
    # lr_decay_iters defaults to max_iters: a resumed run given a larger max_iters must not recompute it,
    # or the learning rate jumps back up from min_lr
    out = tmp_path / "out"
    ok(run_train(["--max_iters=10", "--eval_interval=10"], data_dir, out))
    result = ok(run_train(["--max_iters=16", "--eval_interval=8", "--init_from=resume"], data_dir, out))
    assert "note: continuing with the checkpoint's lr_decay_iters=10 (give a setting on the command line" \
        in result.stdout
    assert "note: changed on resume: eval_interval 10 -> 8, max_iters 10 -> 16" in result.stdout
    assert "resuming from iteration 10 (5,120 tokens)" in result.stdout
    logs, _ = read_metrics(out)
    assert [r["iter"] for r in logs] == list(range(1, 17))
    assert all(r["lr"] == pytest.approx(3e-4) for r in logs[10:])  # min_lr from iteration 10 on
    assert torch.load(out / "ckpt.pt", weights_only=False)["config"]["lr_decay_iters"] == 10


def test_resume_without_the_settings_continues_the_run_as_it_was(short_run, data_dir, tmp_path):
    # only out_dir and data_dir: the shape, data and schedule all come from the checkpoint
    out = tmp_path / "out"
    shutil.copytree(short_run[0], out)
    result = ok(run_main(train.main, ["--init_from=resume", "--device=cpu", "--threads=1", f"--out_dir={out}",
                                      f"--data_dir={data_dir}", "--max_iters=32", "--eval_interval=2",
                                      "--eval_iters=1"]))
    assert "note: continuing with the checkpoint's dataset='fixture'" in result.stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["iter_num"] == 32 and ckpt["model_args"]["dim"] == 32 and ckpt["config"]["batch_size"] == 8


def test_a_bf16_run_resumes_in_float16(data_dir, tmp_path):
    # an A100 run resumed on a T4: the bf16 checkpoint holds no GradScaler state for float16 to load
    out = tmp_path / "out"
    ok(run_train(["--dtype=bfloat16", "--max_iters=4", "--eval_interval=4"], data_dir, out))
    result = ok(run_train(["--dtype=float16", "--max_iters=6", "--eval_interval=6", "--init_from=resume"],
                          data_dir, out))
    assert "dtype 'bfloat16' -> 'float16'" in result.stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["iter_num"] == 6 and ckpt["config"]["dtype"] == "float16" and ckpt["scaler"]["scale"] > 0


TRAIN_THEN_REALLOCATE = """
import resource, sys, torch, train
train.train(train.parse_settings(sys.argv[1:]))
""" + REALLOCATION_FAULTS + "print(faults)"


def test_train_in_process_leaves_the_allocator_alone(data_dir, tmp_path):
    # keep_freed_memory() changes the whole process: only train.py's main() may apply it
    out = subprocess.run([sys.executable, "-c", TRAIN_THEN_REALLOCATE, *TINY, "--max_iters=1",
                          "--eval_interval=1", f"--data_dir={data_dir}", f"--out_dir={tmp_path}"],
                         cwd=ROOT, check=True, capture_output=True, text=True, timeout=240).stdout
    assert int(out.split()[-1]) > 4 * 60_000  # glibc's default: big blocks come fresh from the kernel


# ----------------------------------------------------------------------------- the run folder


def test_checkpoint_interval_and_kept_checkpoints(data_dir, tmp_path):
    out = tmp_path / "out"
    ok(run_train(["--max_iters=9", "--eval_interval=4", "--checkpoint_interval=3", "--keep_checkpoints=2"],
                 data_dir, out))
    iters = {p.name: torch.load(p, weights_only=False)["iter_num"] for p in out.glob("ckpt*.pt")}
    best = min(read_metrics(out)[1], key=lambda r: r["val_loss"])["iter"]
    assert iters == {"ckpt.pt": 9, "ckpt_000006.pt": 6, "ckpt_000009.pt": 9, "ckpt_best.pt": best}


def test_init_from_auto_relaunches_blindly(data_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--init_from=auto", "--eval_interval=4"]
    first = ok(run_train(args + ["--max_iters=4"], data_dir, out))
    assert "resuming" not in first.stdout
    second = ok(run_train(args + ["--max_iters=8"], data_dir, out))
    assert "resuming from iteration 4 (2,048 tokens)" in second.stdout
    assert [r["iter"] for r in read_metrics(out)[0]] == list(range(1, 9))
    # an attempt that died before its first checkpoint left metrics behind: auto starts afresh over them
    (out / "ckpt.pt").unlink()
    ok(run_train(args + ["--max_iters=2", "--eval_interval=2"], data_dir, out))
    assert [r["iter"] for r in read_metrics(out)[0]] == [1, 2]


def test_a_new_run_never_destroys_an_existing_one_unasked(short_run, data_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(short_run[0], out)
    before = (out / "ckpt.pt").read_bytes()
    assert_one_line_error(run_train(["--max_iters=2"], data_dir, out),
                          f"{out} already holds a run (ckpt.pt and metrics.jsonl up to iteration 30): "
                          "--init_from=resume continues it, --overwrite=True replaces it")
    assert (out / "ckpt.pt").read_bytes() == before and len(read_metrics(out)[0]) == 30
    # overwrite=True, but the new run dies before its first checkpoint: the old run is still all there
    result = run_train(["--overwrite=True", "--max_iters=20", "--eval_interval=20", "--learning_rate=1e6",
                        "--warmup_iters=0"], data_dir, out)
    assert_one_line_error(result, "no checkpoint was written")
    assert (out / "replaced" / "ckpt.pt").read_bytes() == before
    # its 30 log lines and its evals at iterations 0, 15 and 30
    assert len((out / "replaced" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()) == 33
    # and a new run that gets to its checkpoint replaces it for good
    ok(run_train(["--overwrite=True", "--max_iters=2", "--eval_interval=2"], data_dir, out))
    assert not (out / "replaced").exists() and [r["iter"] for r in read_metrics(out)[0]] == [1, 2]


def test_the_next_batch_is_made_before_the_host_waits_for_the_device(data_dir, tmp_path, monkeypatch):
    # on a GPU, .item() waits for the step to finish: the next iteration's batch must already be made by
    # then, or the GPU idles while the CPU builds it
    events = []
    real_next, real_item = data.BatchLoader.next_batch, torch.Tensor.item

    def next_batch(self):
        if self.seed != train.EVAL_SEED:  # the training loader
            events.append("batch")
        return real_next(self)

    def item(self):
        events.append("sync")
        return real_item(self)

    monkeypatch.setattr(data.BatchLoader, "next_batch", next_batch)
    monkeypatch.setattr(torch.Tensor, "item", item)
    train.train(train.parse_settings(TINY + ["--max_iters=3", "--eval_interval=100",
                                             "--gradient_accumulation_steps=1", f"--data_dir={data_dir}",
                                             f"--out_dir={tmp_path}"]))
    first_sync = events.index("sync")
    # the first batch, then each iteration's next one, all before that iteration's log line syncs
    assert events[:first_sync] == ["batch", "batch"], events
    assert events.count("batch") == 4  # one made ahead at the end: not trained on, and not counted on resume
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["loader_state"]["batches_consumed"] == 3


# ----------------------------------------------------------------------------- memory: a batch that fits

TINY_ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, vocab_size=512,
                      max_seq_len=32)


def memory_for(batch: int) -> int:
    # available memory in which a micro-batch of `batch` fits (with the 10% headroom) and one more does not
    return int(settings.step_bytes(TINY_ARGS, batch, "float32", "cpu") / 0.9) + 1


def test_a_step_that_cannot_fit_stops_with_a_batch_size_that_does(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "available_bytes", lambda device: memory_for(2))
    message = main_error(TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}"])
    assert re.search(r"a training step of 8 x 32 tokens needs about [\d.]+ GiB "
                     r"\(the \(batch, context, vocab\) logits are most of it\) but [\d.]+ GiB is available: "
                     r"try --batch_size=2 --gradient_accumulation_steps=8 \(the same tokens per iteration\)",
                     message), message
    assert not tmp_path.joinpath("ckpt.pt").exists()


def test_batch_size_auto_keeps_the_tokens_per_iteration(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(settings, "available_bytes", lambda device: memory_for(5))
    train.train(train.parse_settings(TINY + ["--batch_size=auto", "--max_iters=2", "--eval_interval=2",
                                             f"--data_dir={data_dir}", f"--out_dir={tmp_path}"]))
    assert "batch_size=auto: 4 x 4 accumulation steps = 16 sequences per iteration (up to 5 fit, estimated " \
           "against" in capsys.readouterr().out
    recorded = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))["config"]
    assert (recorded["batch_size"], recorded["gradient_accumulation_steps"]) == (4, 4)
    assert read_metrics(tmp_path)[0][-1]["tokens"] == 2 * 16 * 32


def test_batch_size_max_keeps_the_accumulation_and_grows_the_tokens(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(settings, "available_bytes", lambda device: memory_for(5))
    run = TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--eval_interval=2"]
    train.train(train.parse_settings(run + ["--batch_size=max", "--max_iters=2"]))
    printed = capsys.readouterr().out
    assert "batch_size=max: 5 x 2 accumulation steps = 10 sequences per iteration, 320 tokens (in place of " \
           "8 x 2; estimated against" in printed, printed
    assert "tokens per iteration: 320 = 1 process(es) x 2 accumulation step(s) x 5 batch x 32" in printed
    recorded = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))["config"]
    assert (recorded["batch_size"], recorded["gradient_accumulation_steps"]) == (5, 2)
    # a resume keeps the batch the run chose, unless --batch_size=max is given again
    train.train(train.parse_settings(["--init_from=resume", f"--out_dir={tmp_path}", "--max_iters=3"]))
    assert "batch_size=max" not in capsys.readouterr().out
    assert [r["tokens"] for r in read_metrics(tmp_path)[0]] == [320, 640, 960]
    message = main_error(run + ["--batch_size=max", "--batch_size=auto", "--overwrite=True"])
    assert "--batch_size=auto keeps the tokens per iteration and --batch_size=max grows them" in message


# ----------------------------------------------------------------------------- run.c's files beside the run


def test_export_llama2c_writes_run_c_files_beside_the_checkpoints(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train.train(train.parse_settings(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4",
                                             "--eval_interval=2", "--export_llama2c=True"]))
    printed = capsys.readouterr().out
    assert f"./run {out / 'model.bin'} -z {out / 'tokenizer.bin'}" in printed
    assert "saved ckpt_best.pt, ckpt.pt, model_best.bin, model.bin (iteration 4)" in printed
    for ckpt, bin_name in (("ckpt.pt", "model.bin"), ("ckpt_best.pt", "model_best.bin")):
        assert read_llama2c_header(out / bin_name)["version"] == 0  # run.c's
        model, checkpoint = from_checkpoint(out / ckpt)
        exported, _ = from_checkpoint(out / bin_name)
        # (a llama2.c file holds hidden_dim, not the multiple_of it was rounded to)
        assert dataclasses.replace(exported.args, multiple_of=model.args.multiple_of) == model.args
        weights, ours = exported.state_dict(), model.state_dict()
        assert weights.keys() == ours.keys() and all(torch.equal(weights[k], v) for k, v in ours.items())
    tokenizer = Path(checkpoint["tokenizer"])
    write_tokenizer_bin(tmp_path / "expected.bin", tokenizer)
    assert (out / "tokenizer.bin").read_bytes() == (tmp_path / "expected.bin").read_bytes()
    # run.c hard-codes RoPE's theta: a model it would run wrong is refused before training, in one line
    message = main_error(TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'theta'}",
                                 "--export_llama2c=True", "--rope_theta=500000"])
    assert "export_llama2c=True: llama2.c's run.c hard-codes rope_theta=10000" in message


def test_export_llama2c_of_a_lora_run_holds_the_merged_weights(short_run, data_dir, tmp_path):
    base, _ = short_run
    out = tmp_path / "lora"
    train.train(train.parse_settings(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2",
                                             "--eval_interval=2", f"--init_from={base / 'ckpt.pt'}",
                                             "--lora_rank=4", "--export_llama2c=True"]))
    merged, _ = from_checkpoint(out / "ckpt.pt")  # the base with the adapters folded in
    exported, _ = from_checkpoint(out / "model.bin")
    base_model, _ = from_checkpoint(base / "ckpt.pt")
    wq = "layers.0.attention.wq.weight"
    assert torch.allclose(exported.state_dict()[wq], merged.state_dict()[wq], atol=1e-6)
    assert not torch.equal(exported.state_dict()[wq], base_model.state_dict()[wq])  # the adapters trained


# ----------------------------------------------------------------------------- the run's length


def test_a_run_measured_in_tokens(data_dir, tmp_path):
    result = ok(run_train(["--max_tokens=2048", "--eval_interval=100", "--print_model=True"], data_dir,
                          tmp_path / "o"))
    assert re.search(r"^run: 4 iterations \(set by max_tokens=2048\) = 2,048 tokens = 0\.\d\d epochs, "
                     r"0\.\d tokens per parameter; device cpu \(1 CPU threads\)",
                     result.stdout, re.M), result.stdout
    assert re.search(r"^  layers\.1\.feed_forward\.w2\.weight +32x96 +3,072$", result.stdout, re.M)
    logs, evals = read_metrics(tmp_path / "o")
    assert logs[-1]["iter"] == 4 and logs[-1]["tokens"] == 2048 and evals[-1]["iter"] == 4
    recorded = json.loads((tmp_path / "o" / "config.json").read_text(encoding="utf-8"))["config"]
    assert recorded["max_tokens"] == 2048 and recorded["max_iters"] == 4 and recorded["max_epochs"] is None


@pytest.mark.slow
def test_under_torchrun_a_bad_setting_is_said_once(data_dir, tmp_path):
    result = run_train(["--learnig_rate=1e-3"], data_dir, tmp_path / "out", torchrun=2)
    assert result.returncode != 0
    ours = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
    assert ours == ["error: unknown config key 'learnig_rate' (from --learnig_rate=1e-3); did you mean "
                    "'learning_rate'?"]


def test_threads_default_to_half_the_cores(data_dir, tmp_path):
    # with every core taken, another job on the machine stalls the step (tenfold, measured): half by default
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = ok(subprocess.run([sys.executable, TRAIN, *TINY, "--max_iters=1", "--eval_interval=1",
                                f"--data_dir={data_dir}", f"--out_dir={tmp_path}"],
                               capture_output=True, text=True, env=env, timeout=240))
    half = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"device cpu ({half} CPU threads)" in result.stdout
    result = ok(run_train(["--max_iters=1", "--eval_interval=1", "--threads=2", "--overwrite=True"], data_dir,
                          tmp_path))
    assert "device cpu (2 CPU threads)" in result.stdout
