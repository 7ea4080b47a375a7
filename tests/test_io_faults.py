"""A full disk, a read-only folder, a damaged file, through the real command lines: one line that names the
file and the cause, no traceback, nothing half-written left where a later step would take it for whole,
and a resume that continues exactly. A full disk is a small tmpfs where the tests run as root and may mount
one (when LLAMA_TINY_ROOT_TESTS=1 asks), and everywhere an OSError(ENOSPC) at the file-write boundary
(disk_faults.py)."""
import contextlib
import importlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, run_main
from disk_faults import disk_full
from test_train import TINY, main_error, read_metrics

import export
import tinystories as ts
import train
from llamatiny.checkpoint import from_checkpoint
from llamatiny.corpus import make_stories, write_endoftext, write_json_shards

TRAIN, FAULTS = str(ROOT / "train.py"), str(ROOT / "tests" / "disk_faults.py")
RUN = ["--max_iters=8", "--eval_interval=4"]  # checkpoints at iterations 4 and 8
INTACT_AT_4 = "the previous checkpoint {out}/ckpt.pt (iteration 4) is intact; free space and resume with " \
              "--init_from=resume"


def run_train(out, *args, data_dir, fault=None) -> subprocess.CompletedProcess:
    # train.py's main() in this process; fault: (path pattern, nth matching file opened for writing, bytes it
    # takes before the disk is full)
    with disk_full(*fault) if fault else contextlib.nullcontext():
        return run_main(train.main, ["--threads=1", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}",
                                     *args])


def one_line_error(result) -> str:
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    return errors[0]


def losses(out) -> list:
    logs, evals = read_metrics(out)
    steps = [(r["iter"], r["loss"], r["grad_norm"]) for r in logs]
    return steps + [(r["iter"], r["val_loss"]) for r in evals]


# the tests that mount filesystems as root run only when asked: they change the host's mount table
ROOT_TESTS_VAR = "LLAMA_TINY_ROOT_TESTS"
ROOT_TESTS = os.environ.get(ROOT_TESTS_VAR, "") not in ("", "0")


def intact_at(out, iteration):
    # the checkpoint resume takes loads, at the iteration the message names, and metrics.jsonl ends there
    assert from_checkpoint(out / "ckpt.pt")[1]["iter_num"] == iteration
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    text = (out / "metrics.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n") and max(json.loads(line)["iter"] for line in text.splitlines()) == iteration


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    # the uninterrupted run the interrupted ones must match
    out = tmp_path_factory.mktemp("reference") / "out"
    result = run_train(out, *RUN, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def small_disk(tmp_path):
    mounted = []

    def mount(size_kb: int, name="disk") -> Path:
        if not ROOT_TESTS:
            pytest.skip(f"mounts a small tmpfs as root: set {ROOT_TESTS_VAR}=1 to run it (CI does); the "
                        f"injected-ENOSPC tests cover the same code")
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root (the injected-ENOSPC tests cover the same code)")
        path = tmp_path / name
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the injected-ENOSPC tests cover it")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def read_only():
    # a folder made read-only: a read-only bind mount as root (who ignores permissions), else chmod
    made = []

    def make(path: Path) -> str:
        if os.geteuid() == 0:  # who ignores permissions
            if not ROOT_TESTS:
                pytest.skip(f"as root, a read-only folder is a read-only bind mount: set {ROOT_TESTS_VAR}=1 "
                            f"to run it (CI does)")
            r = subprocess.run(f"mount --bind {shlex.quote(str(path))} {shlex.quote(str(path))} && "
                               f"mount -o remount,bind,ro {shlex.quote(str(path))}", shell=True,
                               capture_output=True, text=True)
            if r.returncode:
                subprocess.run(["umount", str(path)], capture_output=True)
                pytest.skip(f"cannot mount read-only here: {r.stderr.strip()}")
        else:
            path.chmod(0o555)
        made.append(path)
        return "read-only file system" if os.geteuid() == 0 else "permission denied"

    yield make
    for path in made:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(path)], check=False)
        else:
            path.chmod(0o755)


# ----------------------------------------------------------------------------- train.py: a full disk


@pytest.mark.slow
def test_disk_full_while_saving_a_checkpoint(reference, data_dir, tmp_path):
    out = tmp_path / "out"
    # the second checkpoint finds 4 KiB of room; torch's zip writer would call that "unexpected pos"
    line = one_line_error(run_train(out, *RUN, data_dir=data_dir, fault=(r"ckpt.*\.pt\.tmp$", 2, 4096)))
    expected = re.escape(f"error: no space left on device writing {out}/ckpt") + "(_best)?" + \
        re.escape(".pt: " + INTACT_AT_4.format(out=out))
    assert re.fullmatch(expected, line), line
    intact_at(out, 4)
    assert run_train(out, *RUN, "--init_from=resume", data_dir=data_dir).returncode == 0
    assert losses(out) == losses(reference)


@pytest.mark.slow
def test_disk_full_on_a_small_filesystem(reference, data_dir, small_disk):
    # room for one checkpoint and a half: the second cannot be written
    ckpt = (reference / "ckpt.pt").stat().st_size
    disk = small_disk((ckpt + ckpt // 2) // 1024 + 64)
    out = disk / "out"
    line = one_line_error(run_train(out, *RUN, data_dir=data_dir))
    assert line.startswith(f"error: no space left on device writing {out}/ckpt"), line
    assert line.endswith(INTACT_AT_4.format(out=out)), line
    intact_at(out, 4)
    subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)  # space freed
    assert run_train(out, *RUN, "--init_from=resume", data_dir=data_dir).returncode == 0
    assert losses(out) == losses(reference)


@pytest.mark.parametrize("file, fault, then", [
    # metrics.jsonl: its 7th append (iteration 5, after the eval at 0 and at 4) gets 20 bytes, half a line
    ("metrics.jsonl", (r"metrics\.jsonl$", 7, 20), INTACT_AT_4),
    ("config.json", (r"config\.json\.tmp$", 1, 100),
     "no checkpoint was written; free space and run the same command again"),
], ids=["metrics.jsonl", "config.json"])
def test_disk_full_while_writing_the_run_folder(data_dir, tmp_path, file, fault, then):
    out = tmp_path / "out"
    line = one_line_error(run_train(out, *RUN, data_dir=data_dir, fault=fault))
    assert line == f"error: no space left on device writing {out / file}: " + then.format(out=out)
    if file == "metrics.jsonl":
        intact_at(out, 4)  # the half line and the lines after the checkpoint are gone
    else:
        assert sorted(os.listdir(out)) == []


@pytest.mark.slow
def test_ddp_every_rank_stops_when_rank_0_cannot_save(data_dir, tmp_path):
    # two gloo processes started as torchrun starts them, but without torchrun, which would kill the second
    # as soon as the first exits: each must stop on its own, none waiting for the other in a collective
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    args = TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", *RUN]
    ranks = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   FAULT_FILE=r"ckpt.*\.pt\.tmp$", FAULT_OPEN="2", FAULT_AFTER="4096")
        stderr = open(tmp_path / f"rank{rank}.err", "w+")
        ranks.append((subprocess.Popen([sys.executable, FAULTS, TRAIN, *args], stdout=subprocess.DEVNULL,
                                       stderr=stderr, env=env, cwd=tmp_path), stderr))
    try:
        codes = [proc.wait(timeout=180) for proc, _ in ranks]
    finally:
        for proc, stderr in ranks:
            proc.kill()
            stderr.close()
    rank0, rank1 = ((tmp_path / f"rank{rank}.err").read_text() for rank in range(2))
    # rank 0 says why in one line; rank 1 stops with it, quietly
    assert codes == [1, 1] and rank1 == "", rank0 + rank1
    assert rank0.count("\n") == 1, rank0
    assert rank0.startswith(f"error: no space left on device writing {out}/ckpt"), rank0
    intact_at(out, 4)


# ---------------------------------------------------------------------- train.py: folders, damaged files


def test_read_only_out_dir_is_refused_before_any_work(tmp_path, read_only):
    folder = tmp_path / "runs"
    folder.mkdir()
    reason = read_only(folder)
    # no data at all: the out_dir is checked first
    line = one_line_error(run_train(folder / "15m", "--max_iters=2", data_dir=tmp_path / "nothing"))
    assert line == f"error: {reason} writing {folder / '15m'}: pass another --out_dir"


@pytest.fixture(scope="module")
def kept(data_dir, tmp_path_factory):
    # ckpt.pt, ckpt_best.pt and the last two numbered checkpoints, 4 and 6
    out = tmp_path_factory.mktemp("kept") / "out"
    result = run_train(out, "--max_iters=6", "--eval_interval=2", "--keep_checkpoints=2", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    return out


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.unlink()  # a new file, as a copy is: the hard links to the old bytes keep them
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # another program's file
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "not a checkpoint")


DAMAGED = {"truncated": "truncated (", "empty": "empty: a copy or transfer cut short",
           "foreign": "not a checkpoint written by train.py ("}


@pytest.mark.parametrize("how", ["truncated", "empty", "foreign"])
def test_damaged_checkpoint_names_the_newest_good_one(kept, data_dir, tmp_path, how):
    out = tmp_path / "out"
    shutil.copytree(kept, out)
    damage(out / "ckpt.pt", how)
    argv = TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=8", "--init_from=resume"]
    message = main_error(argv)
    assert message.startswith(f"error: {out / 'ckpt.pt'} is {DAMAGED[how]}")
    newest = out / "ckpt_000006.pt"
    assert message.endswith(f"; the newest good checkpoint beside it is {newest} (iteration 6): "
                            f"`cp {newest} {out / 'ckpt.pt'}` and run the same command again")
    assert message.count("newest good checkpoint") == 1
    # the newest is damaged too: the next one; none left: the message alone
    damage(out / "ckpt_000006.pt", how)
    damage(out / "ckpt_best.pt", how)
    assert f"is {out / 'ckpt_000004.pt'} (iteration 4): `cp " in main_error(argv)
    damage(out / "ckpt_000004.pt", how)
    assert "newest good" not in main_error(argv)


@pytest.mark.parametrize("command", ["sample", "export", "eval"])
def test_a_truncated_checkpoint_is_called_so_by_the_commands_that_read_it(kept, tmp_path, capsys, command):
    out = tmp_path / "out"
    shutil.copytree(kept, out)
    size = (out / "ckpt_best.pt").stat().st_size
    damage(out / "ckpt_best.pt", "truncated")
    damage(out / "ckpt_000006.pt", "empty")
    path = out / "ckpt_best.pt"
    argv = {"sample": [f"--checkpoint={path}", "--max_new_tokens=4"],
            "export": [str(tmp_path / "model.bin"), f"--checkpoint={path}"],
            "eval": [f"--checkpoint={path}", f"--input={tmp_path}"]}[command]
    with pytest.raises(SystemExit):
        importlib.import_module(command).main(argv)  # (eval.py's module name hides a built-in)
    [line] = capsys.readouterr().err.splitlines()
    # ckpt.pt is at iteration 6 too, but ckpt_000006.pt, its numbered copy, is cut short as well
    good = out / "ckpt.pt"
    assert line.endswith(f"{path} is truncated ({size // 2:,} bytes, its end missing): a copy or transfer "
                         f"cut short, or a damaged disk; the newest good checkpoint beside it is {good} "
                         f"(iteration 6): `cp {good} {path}` and run the same command again"), line
    assert "PytorchStreamReader" not in line and not (tmp_path / "model.bin").exists()


@pytest.mark.slow
def test_the_command_for_a_damaged_checkpoint_resumes(kept, data_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(kept, out)
    damage(out / "ckpt.pt", "truncated")
    args = ["--max_iters=8", "--eval_interval=2", "--init_from=resume"]
    line = one_line_error(run_train(out, *args, data_dir=data_dir))
    src, dst = shlex.split(re.search(r"`cp (.+)` and run the same command again$", line)[1])
    shutil.copyfile(src, dst)
    result = run_train(out, *args, data_dir=data_dir)
    assert result.returncode == 0 and "resuming from iteration 6" in result.stdout, result.stderr
    assert [r["iter"] for r in read_metrics(out)[0]] == list(range(1, 9))


def test_a_shard_of_odd_length_is_refused_by_train_py(data_dir, tmp_path):
    data = tmp_path / "shards"
    shutil.copytree(data_dir / "fixture", data / "fixture")
    shard = data / "fixture" / "data01.bin"
    with open(shard, "ab") as f:
        f.write(b"\0")  # half a token: a copy cut short
    line = one_line_error(run_train(tmp_path / "out", "--max_iters=2", data_dir=data))
    command = f"python tinystories.py prepare --input YOUR_TEXT --name fixture --data_dir {data}"
    assert line == f"error: {shard} is damaged (an odd size, not uint16 token ids): run `{command}` again"


# ----------------------------------------------------------------------------- the data stage


@pytest.fixture
def own_text(tmp_path_factory):
    # a text to prepare and its 512-token vocabulary, outside the data folder
    d = tmp_path_factory.mktemp("own_text")
    write_endoftext(d / "stories.txt", make_stories(400, seed=5))
    ts.train_vocab(d, 512, input=d / "stories.txt", name="mine")
    return d / "stories.txt", d / "mine" / "tok512.model"


def errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]


# nothing a later step takes for finished shards: no shards at all, or shards without their meta.json
@pytest.mark.parametrize("fault, written, left", [
    (r"data\d+\.bin\.tmp$", "mine", None),
    (r"meta\.json\.tmp$", "mine/meta.json", ["data00.bin", "data01.bin"]),
])
def test_prepare_on_a_full_disk(own_text, tmp_path, capsys, fault, written, left):
    text, model = own_text
    with disk_full(fault, room=10):  # forked workers inherit it
        rc = ts.main(["prepare", "--input", str(text), "--name", "mine", "--tokenizer", str(model),
                      "--data_dir", str(tmp_path)])
    assert rc == 1 and errors(capsys) == [f"error: no space left on device writing {tmp_path / written}"]
    out = tmp_path / "mine"
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == left


def test_pretokenize_on_a_small_filesystem(tmp_path, small_disk, capsys):
    disk = small_disk(4096)
    write_json_shards(str(disk / ts.TINYSTORIES_DIR), make_stories(600, seed=4), 2)
    ts.train_vocab(disk, 512)
    used_kb = int(subprocess.run(["du", "-sk", str(disk)], capture_output=True, text=True).stdout.split()[0])
    subprocess.run(["mount", "-o", f"remount,size={used_kb + 32}k", str(disk)], check=True)  # a full disk
    assert ts.main(["pretokenize", "--vocab_size", "512", "--data_dir", str(disk)]) == 1
    assert errors(capsys) == [f"error: no space left on device writing {disk / 'tok512'}"]
    assert not (disk / "tok512").exists()


@pytest.mark.parametrize("command", ["download", "train_vocab", "pretokenize", "prepare"])
def test_read_only_data_dir_is_refused_before_any_work(tmp_path, read_only, capsys, command):
    data = tmp_path / "data"
    write_json_shards(str(data / ts.TINYSTORIES_DIR), make_stories(100, seed=6), 2)
    ts.train_vocab(data, 300)
    write_endoftext(tmp_path / "in.txt", make_stories(20, seed=6))
    reason = read_only(data)
    capsys.readouterr()
    args, target = {
        # a server that does not exist: only the check before the download can answer first
        "download": (["--url", "http://127.0.0.1:9/x.tar.gz"], data),
        "train_vocab": (["--vocab_size", "256"], data),
        "pretokenize": (["--vocab_size", "300"], data / "tok300"),
        "prepare": (["--input", str(tmp_path / "in.txt"), "--name", "mine", "--vocab_size", "300",
                     "--tokenizer", str(data / "tok300.model")], data / "mine"),
    }[command]
    assert ts.main([command, "--data_dir", str(data), *args]) == 1
    assert errors(capsys) == [f"error: {reason} writing {target}"]


# ----------------------------------------------------------------------------- export.py


def export_error(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        export.main(argv)
    [line] = errors(capsys)
    return line


@pytest.mark.parametrize("fmt, name, fault", [("llama2c", "model.bin", r"model\.bin\.tmp$"),
                                              ("hf", "hf", r"model\.safetensors\.tmp$"),
                                              ("pt", "model.pt", r"model\.pt\.tmp$")])
def test_export_on_a_full_disk(reference, tmp_path, capsys, fmt, name, fault):
    with disk_full(fault, room=1000):
        argv = [str(tmp_path / name), f"--checkpoint={reference}/ckpt.pt", f"--format={fmt}"]
        line = export_error(argv, capsys)
    written = tmp_path / name / "model.safetensors" if fmt == "hf" else tmp_path / name
    assert line == f"error: no space left on device writing {written}"
    # no model file, and for hf no config.json: a later load says the export is missing, not damaged
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_export_to_a_read_only_folder(reference, tmp_path, read_only, capsys):
    folder = tmp_path / "exports"
    folder.mkdir()
    reason = read_only(folder)
    line = export_error([str(folder / "model.bin"), f"--checkpoint={reference / 'ckpt.pt'}"], capsys)
    assert line == f"error: {reason} writing {folder}"
    assert os.listdir(folder) == []
