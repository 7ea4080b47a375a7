import json
import sys

import runs

CONFIG = {"wandb_project": "p", "wandb_run_name": None}


def test_truncate_metrics_drops_lines_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"iter": i, "loss": 1.0}) + "\n" for i in range(1, 9)), encoding="utf-8")
    runs.truncate_metrics(str(path), 5)
    assert [json.loads(line)["iter"] for line in path.read_text(encoding="utf-8").splitlines()] == [1, 2, 3, 4, 5]


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
