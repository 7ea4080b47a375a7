import json
import os
import sys

import pytest

from llamatiny import runs

CONFIG = {"wandb_project": "p", "wandb_run_name": None}


def test_truncate_metrics_drops_lines_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"iter": i, "loss": 1.0}) + "\n" for i in range(1, 9)),
                    encoding="utf-8")
    runs.truncate_metrics(str(path), 5)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["iter"] for line in lines] == [1, 2, 3, 4, 5]


def test_wandb_failures_never_stop_training(monkeypatch, tmp_path, capsys):
    import types

    class Broken(types.ModuleType):
        def init(self, **kwargs):
            raise RuntimeError("no network")

    monkeypatch.setitem(sys.modules, "wandb", Broken("wandb"))
    logger = runs.WandbLogger(CONFIG, str(tmp_path), resume=False)
    logger.log({"loss": 1.0}, step=1)  # a no-op now
    assert logger.run is None and "wandb disabled (RuntimeError: no network)" in capsys.readouterr().out

    class Flaky(types.ModuleType):
        def init(self, **kwargs):
            return types.SimpleNamespace(id="abc", log=self.log)

        def log(self, *args, **kwargs):
            raise ConnectionError("lost")

    monkeypatch.setitem(sys.modules, "wandb", Flaky("wandb"))
    logger = runs.WandbLogger(CONFIG, str(tmp_path), resume=False)
    assert logger.run is not None and (tmp_path / "wandb_run_id").read_text(encoding="utf-8") == "abc"
    logger.log({"loss": 1.0}, step=1)
    assert logger.run is None


def test_format_duration():
    assert [runs.format_duration(s) for s in (0.4, 59, 61, 3599, 3600, 90061)] == \
        ["0s", "59s", "1m01s", "59m59s", "1h00m", "25h01m"]


def test_progress_leaves_the_first_step_and_evals_out_of_the_time_left(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(runs.time, "perf_counter", lambda: now[0])
    p = runs.Progress(eval_interval=10, elapsed_before=50.0)
    now[0] += 30  # the first step compiles
    p.step_done()
    assert p.first_step_s == 30 and p.window() is None and p.left(1, 100) is None
    for _ in range(9):  # iterations 2..10, one second each
        now[0] += 1
        p.step_done()
    assert p.window() == 1.0
    now[0] += 5  # an eval and a checkpoint
    p.not_timed(5, evaluation=True)
    for _ in range(10):  # iterations 11..20, two seconds each
        now[0] += 2
        p.step_done()
    assert p.window() == 2.0 and p.s_per_iter == pytest.approx(0.7 * 1.0 + 0.3 * 2.0)
    # 80 iterations left at the smoothed 1.3 s, and 8 evals at the last one's 5 s
    assert p.left(20, 100) == pytest.approx(80 * 1.3 + 8 * 5)
    assert p.elapsed() == 50 + 30 + 9 + 5 + 20


def test_save_checkpoints_keeps_latest_best_and_the_last_n(tmp_path):
    import torch

    from llamatiny.checkpoint import save_checkpoint

    for it in range(1, 6):
        runs.save_checkpoints(str(tmp_path), {"iter_num": it}, latest=True, best=it == 2, keep=2,
                              save=save_checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "ckpt_000004.pt", "ckpt_000005.pt",
                                                          "ckpt_best.pt"]
    load = lambda name: torch.load(tmp_path / name)["iter_num"]
    assert (load("ckpt.pt"), load("ckpt_best.pt"), load("ckpt_000004.pt")) == (5, 2, 4)
    # a best checkpoint between two latest ones leaves the latest alone
    runs.save_checkpoints(str(tmp_path), {"iter_num": 6}, latest=False, best=True, keep=2,
                          save=save_checkpoint)
    assert (load("ckpt.pt"), load("ckpt_best.pt")) == (5, 6)
    assert runs.numbered_checkpoints(tmp_path) == [str(tmp_path / "ckpt_000004.pt"),
                                                   str(tmp_path / "ckpt_000005.pt")]


def test_previous_run_describes_what_is_there(tmp_path):
    assert runs.previous_run(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text('{"iter": 10, "loss": 1}\n{"iter": 20, "loss"', encoding="utf-8")
    assert runs.previous_run(tmp_path) == "metrics.jsonl up to iteration 10"
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    assert runs.previous_run(tmp_path) == "ckpt.pt and metrics.jsonl up to iteration 10"
    aside = runs.set_aside_previous_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replaced"]
    assert sorted(os.listdir(aside)) == ["ckpt.pt", "metrics.jsonl"]
    runs.drop_previous_run(tmp_path)
    assert list(tmp_path.iterdir()) == []
