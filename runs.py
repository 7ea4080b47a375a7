"""
A training run's folder, out_dir: what train.py writes there besides the checkpoint, and the
random-number state a checkpoint carries so that a resumed run continues exactly; and the readers
of those files (plot.py's).

    out_dir/config.json     the resolved settings, git commit, library versions, command line
    out_dir/metrics.jsonl   one JSON object per log line {iter, tokens, loss, lr, ...} and per eval
                            {iter, tokens, train_loss, val_loss}
    out_dir/ckpt.pt         the checkpoint (checkpoint.save_checkpoint writes it atomically)
"""
import json
import os
import random
import subprocess
import sys
from datetime import datetime, timezone

import numpy as np
import torch


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                             text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_run_info(out_dir, config: dict, world_size: int) -> None:
    info = {"config": config, "git": git_revision(), "torch": torch.__version__,
            "python": sys.version.split()[0], "world_size": world_size,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv}
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)


def append_jsonl(path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path, last_iter: int) -> None:
    # a resumed run repeats the iterations after its checkpoint: drop the old lines for them
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["iter"] <= last_iter:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                pass  # a line cut short by a crash
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def read_run_info(out_dir) -> dict | None:
    # config.json as write_run_info wrote it; None for a folder without one
    path = os.path.join(out_dir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# the numbers each kind of metrics.jsonl record must hold ("mfu" may be None, so it is not among them)
LOG_FIELDS = ("iter", "tokens", "loss", "lr", "dt_ms", "tok_per_s")
EVAL_FIELDS = ("iter", "tokens", "val_loss")


def read_metrics(out_dir) -> tuple[list[dict], list[dict], int]:
    """out_dir/metrics.jsonl as (log records, eval records, damaged lines skipped), each list in iteration
    order and one clean history: where a resumed run went back to its checkpoint, its lines replace the
    earlier ones from that iteration on (the last occurrence of an iteration wins, and nothing after it
    from the abandoned attempt survives)."""
    logs, evals, skipped, top = [], [], 0, -1
    # errors="replace": bytes garbled on disk make a damaged line, not a crash
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
                is_log = "loss" in rec
                if not is_log and "val_loss" not in rec:
                    continue  # a kind of record this reader does not know
                ok = isinstance(rec["iter"], int) and all(
                    isinstance(rec[k], (int, float)) for k in (LOG_FIELDS if is_log else EVAL_FIELDS))
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash, or not a record at all
                ok = False
            if not ok:
                skipped += 1
                continue
            it, same_kind = rec["iter"], logs if is_log else evals
            # within one attempt iterations only grow (a log line comes before the eval at its iteration)
            if it < top or (same_kind and same_kind[-1]["iter"] == it):
                logs = [r for r in logs if r["iter"] < it]
                evals = [r for r in evals if r["iter"] < it]
            (logs if is_log else evals).append(rec)
            top = it
    return logs, evals, skipped


def get_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded onto a GPU moved it there
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


class WandbLogger:
    # imported only when asked for; any wandb failure turns it off with one warning, training goes on
    def __init__(self, config: dict, out_dir: str, resume: bool, say=print):
        self.run, self.say = None, say
        try:
            import wandb

            id_file = os.path.join(out_dir, "wandb_run_id")
            run_id = None  # a resumed run continues its wandb run, as its checkpoint continues the training
            if resume and os.path.exists(id_file):
                with open(id_file, encoding="utf-8") as f:
                    run_id = f.read().strip()
            self.run = wandb.init(project=config["wandb_project"], id=run_id, resume="allow" if run_id else None,
                                  name=config["wandb_run_name"] or os.path.basename(os.path.abspath(out_dir)),
                                  config=config)
            with open(id_file, "w", encoding="utf-8") as f:
                f.write(self.run.id)
        except Exception as e:
            self._disable(e)

    def log(self, data: dict, step: int) -> None:
        if self.run is not None:
            try:
                self.run.log(data, step=step)
            except Exception as e:
                self._disable(e)

    def _disable(self, e: Exception) -> None:
        self.say(f"warning: wandb disabled ({type(e).__name__}: {e}); training continues")
        self.run = None
