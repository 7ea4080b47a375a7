"""
A training run's folder, out_dir: what train.py writes there besides the checkpoint, and the
random-number state a checkpoint carries so that a resumed run continues exactly; and the readers
of those files (plot.py's; the checkpoint a run folder stands for, which sample.py, eval.py and export.py
read).

    out_dir/config.json     the resolved settings (and as given, those resolution fills in), git commit,
                            library versions, command line
    out_dir/metrics.jsonl   one JSON object per log line {iter, tokens, loss, lr, ...} and per eval
                            {iter, tokens, train_loss, val_loss}
    out_dir/ckpt.pt         the latest checkpoint, every checkpoint_interval iterations: what resume continues
    out_dir/ckpt_best.pt    the checkpoint with the best val loss so far
    out_dir/ckpt_NNNNNN.pt  with keep_checkpoints=N, the last N checkpoints by iteration
    out_dir/model.bin       with export_llama2c=True, run.c's file beside ckpt.pt (model_best.bin beside
                            ckpt_best.pt), and its tokenizer.bin
    out_dir/replaced/       a previous run's files, while a new run started with overwrite=True has no
                            checkpoint of its own yet
Checkpoints are written atomically (checkpoint.save_checkpoint): a crash never leaves half of one. A write
that fails (a full disk, a read-only folder) is a fileio.WriteError, one line naming the file.
"""
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch

from llamatiny.fileio import atomic_write, link_or_copy, writing


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                             text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_run_info(out_dir, config: dict, as_given: dict, world_size: int) -> None:
    # config: the resolved settings; as_given: those that resolution filled in, as they were given
    info = {"config": config, "as_given": as_given, "git": git_revision(), "torch": torch.__version__,
            "python": sys.version.split()[0], "world_size": world_size,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv}
    with atomic_write(os.path.join(out_dir, "config.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)


def append_jsonl(path, record: dict) -> None:
    with writing(path), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path, last_iter: int) -> None:
    # a resumed run repeats the iterations after its checkpoint: drop the old lines for them, and a line cut
    # short by a crash or a full disk. The lines kept are the file's start: it is cut in place, which needs
    # no free space.
    if not os.path.exists(path):
        return
    keep = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                if not line.endswith(b"\n") or json.loads(line)["iter"] > last_iter:
                    break
            except (ValueError, KeyError, TypeError):
                break
            keep += len(line)
    with writing(path):
        os.truncate(path, keep)


def numbered_checkpoints(out_dir) -> list[str]:
    """ckpt_NNNNNN.pt files, oldest first."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    found = [(int(m[1]), name) for name in names if (m := re.fullmatch(r"ckpt_(\d+)\.pt", name))]
    return [os.path.join(out_dir, name) for _, name in sorted(found)]


def save_checkpoints(out_dir, state: dict, latest: bool, best: bool, keep: int, save) -> list[str]:
    """Writes state as ckpt_best.pt (best), ckpt_NNNNNN.pt (latest, keep > 0) and ckpt.pt (latest), deleting
    the numbered ones beyond the last `keep` only once the new one is on disk. save(path, state) writes one
    file atomically; the others are hard links to it (copies where links are not possible). ckpt.pt, what
    resume continues, comes last: a save that fails (a full disk) leaves it at the previous checkpoint.
    Returns the paths."""
    written = []

    def place(path):
        if not written:
            save(path, state)
        else:  # the same bytes again: link them under the new name, atomically
            link_or_copy(written[0], path)
        written.append(path)

    if best:
        place(os.path.join(out_dir, "ckpt_best.pt"))
    if latest and keep > 0:
        place(os.path.join(out_dir, f"ckpt_{state['iter_num']:06d}.pt"))
        for old in numbered_checkpoints(out_dir)[:-keep]:
            os.remove(old)
    if latest:
        place(os.path.join(out_dir, "ckpt.pt"))
    return written


def checkpoint_of(run_dir) -> str | None:
    """The checkpoint that a run folder's name stands for: its best (ckpt_best.pt), else its latest."""
    for name in ("ckpt_best.pt", "ckpt.pt"):
        if os.path.isfile(path := os.path.join(run_dir, name)):
            return path
    return None


def find_checkpoint(path: str, default: str) -> str:
    """--checkpoint as sample.py, eval.py and export.py read it -> what to load, with a note on stderr when
    that is not the path itself. A run folder (out/15m) is its best checkpoint, else its latest; the default
    (out/ckpt.pt, where llama2.c's train.py writes), when it does not exist, is the most recent run in its
    folder (out/): the one that saved last, as llama2.c's out/ckpt.pt is the last run's. A run folder without
    a checkpoint yet is a FileNotFoundError that says so."""
    if os.path.isdir(path) and (found := checkpoint_of(path)):
        print(f"note: {path} is a run folder: reading {found} ({describe_checkpoint(found)})",
              file=sys.stderr)
        return found
    if os.path.isfile(os.path.join(path, "metrics.jsonl")):
        raise FileNotFoundError(f"{path} is a run folder with no checkpoint yet: train.py writes ckpt.pt "
                                f"every checkpoint_interval iterations and at the end")
    if path != default or os.path.exists(path):
        return path
    parent = os.path.dirname(path) or "."
    names = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
    found = [c for name in names if (c := checkpoint_of(os.path.join(parent, name)))]
    if not found:
        return path
    found.sort(key=lambda c: max(os.path.getmtime(p) for p in (c, os.path.join(os.path.dirname(c), "ckpt.pt"))
                                 if os.path.exists(p)), reverse=True)
    others = f"; {len(found) - 1} older run(s) there" if len(found) > 1 else ""
    print(f"note: no {path}; reading {found[0]} ({describe_checkpoint(found[0])}), of the most recent run in "
          f"{parent}/{others} (--checkpoint=RUN_FOLDER picks one)", file=sys.stderr)
    return found[0]


def describe_checkpoint(path: str) -> str:
    return "its best val loss; ckpt.pt is the latest" if path.endswith("ckpt_best.pt") \
        else "its latest; it has no ckpt_best.pt"


def previous_run(out_dir) -> str | None:
    """What a run already in out_dir left (for the message that refuses to start over it), or None."""
    metrics, ckpt = os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "ckpt.pt")
    if not (os.path.exists(metrics) or os.path.exists(ckpt)):
        return None
    last = None
    if os.path.exists(metrics):
        with open(metrics, encoding="utf-8") as f:
            for line in f:
                try:
                    last = json.loads(line)["iter"]
                except (ValueError, KeyError, TypeError):
                    pass
    held = " and ".join(name for name in ("ckpt.pt", "metrics.jsonl")
                        if os.path.exists(os.path.join(out_dir, name)))
    return held + (f" up to iteration {last}" if last is not None else "")


def set_aside_previous_run(out_dir) -> str:
    """Moves a previous run's files to out_dir/replaced/ until the new run has a checkpoint of its own."""
    aside = os.path.join(out_dir, "replaced")
    shutil.rmtree(aside, ignore_errors=True)
    with writing(aside):
        os.makedirs(aside)
    for name in os.listdir(out_dir):
        if (name in ("metrics.jsonl", "config.json", "wandb_run_id")
                or re.fullmatch(r"ckpt(_best|_\d+)?\.pt", name)):
            os.replace(os.path.join(out_dir, name), os.path.join(aside, name))
    return aside


def drop_previous_run(out_dir) -> None:
    shutil.rmtree(os.path.join(out_dir, "replaced"), ignore_errors=True)


def read_run_info(out_dir) -> dict | None:
    # config.json as write_run_info wrote it; None for a folder without one
    path = os.path.join(out_dir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# the numbers each kind of metrics.jsonl record must hold ("mfu" may be None, so it is not among them)
LOG_FIELDS = ("iter", "tokens", "loss", "lr", "dt_ms")  # tok_per_s is None on a first, untimed step
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
            self.run = wandb.init(project=config["wandb_project"], id=run_id,
                                  resume="allow" if run_id else None,
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


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """The run's clock: wall time since the run began (across resumes), and the time per iteration that
    predicts the time left. The first step of a process (torch.compile, warm-up), evals and checkpoints
    stay out of the time per iteration; evals are counted in the time left by their own last duration."""

    SMOOTHING = 0.7  # weight of the previous estimate at each log line

    def __init__(self, eval_interval: int, elapsed_before: float = 0.0):
        self.eval_interval, self.elapsed_before = eval_interval, elapsed_before
        self.start = self.window_start = time.perf_counter()
        self.window_iters = 0
        self.first_step_s = None  # seconds, once the first step is done
        self.s_per_iter = None
        self.eval_s = 0.0

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def step_done(self) -> None:
        if self.first_step_s is None:
            now = time.perf_counter()
            self.first_step_s, self.window_start = now - self.window_start, now
            return
        self.window_iters += 1

    def window(self) -> float | None:
        """Seconds per iteration since the last call (None right after the first step), and a new window."""
        now = time.perf_counter()
        dt = (now - self.window_start) / self.window_iters if self.window_iters else None
        if dt is not None:
            self.s_per_iter = dt if self.s_per_iter is None else \
                self.SMOOTHING * self.s_per_iter + (1 - self.SMOOTHING) * dt
        self.window_start, self.window_iters = now, 0
        return dt

    def not_timed(self, seconds: float, evaluation: bool = False) -> None:
        # an eval or a checkpoint took `seconds`: leave them out of the time per iteration
        self.window_start += seconds
        if evaluation:
            self.eval_s = seconds

    def left(self, iter_num: int, max_iters: int) -> float | None:
        if self.s_per_iter is None:
            return None
        remaining = max_iters - iter_num
        evals = remaining // self.eval_interval + (remaining % self.eval_interval > 0)
        return remaining * self.s_per_iter + evals * self.eval_s
