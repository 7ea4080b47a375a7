"""
See training runs: the loss, learning rate and throughput of one or more out_dirs in one figure, or a table.

    python plot.py out/15m out/42m out/lr3e-4          # runs.png, one colour per run
    python plot.py out/debug* -o debug.png --x=tokens --log
    python plot.py out/15m --xlim=0,5000 --ylim=1,3    # the first 5,000 iterations, loss 1 to 3
    python plot.py out/* --x=tokens --xlim=,2000M      # up to 2,000 M tokens (--x=time: --xlim=0,2h)
    python plot.py out/* --table                        # one row per run; needs no matplotlib

The top panel holds each run's training loss, smoothed, with the raw loss faint behind it, and its val
loss as dots on a dashed line; below them are the learning rate and the tokens per second. The smoothing
is an exponential moving average over the logged points: each point is W times the previous average plus
(1 - W) times its loss. By default W = 1 - 1 / (2% of the run's logged points), an average over about the
last 2% of the run (0.99 for 5,000 points; none below 50); --smooth=W sets it for every run (0 = none).
The legend, below the panels, names each run by its out_dir and the settings (from its config.json) whose
values differ between the runs. --xlim zooms every panel in on part of the x axis, each panel's y axis fitted
to what is shown there; --ylim sets the loss axis. Arguments that are not run folders (out/* also matches
files) are skipped with a note.

--x=time is the training time: each log line's ms/iter times the iterations since the previous line, so
evals and checkpoints are left out. A run still going, a resumed run (where it went back to a checkpoint,
its later lines replace the earlier ones) and a DDP run (rank 0 writes the file) all read as one clean
history; a line cut short by a crash is skipped with a note. Plotting needs matplotlib
(pip install matplotlib); --table does not.
"""
import argparse
import math
import os
import re
import sys
import textwrap
from dataclasses import dataclass

import numpy as np

from llamatiny import runs

SPAN = 0.02  # the default moving average spans about this fraction of a run's logged points
LEGEND_CHARS = 120  # longer legend labels wrap, so that the legend keeps to the figure's width
LEGEND_LINE_IN = 0.18  # the figure grows by this many inches per legend line, so that the panels keep theirs
# --xlim / --ylim values: 5000, 2000M, 1.5B; on the time axis 90s, 30min, 2h (a bare number is seconds)
SUFFIXES = {"k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}
TIME_SUFFIXES = {"s": 1, "min": 60, "h": 3600}
# settings that say where a run's files are or how it was started or logged, not how it trained
IGNORED = ("out_dir", "data_dir", "init_from", "eval_only", "device", "always_save_checkpoint")
# settings train.py's resolve_config fills from others when left at None (min_lr = learning_rate / 10,
# lr_decay_iters = max_iters): named only where some run set them otherwise
DERIVED = {"min_lr": ("learning_rate", 0.1), "lr_decay_iters": ("max_iters", 1)}
TABLE_NOTE = ("time: the run's wall time, evals and checkpoints included "
              "(for runs that do not record it, the training steps' time from ms/iter)\n"
              "tok/s: training throughput, evals excluded; MFU: time-weighted, where the GPU's peak is known")


class PlotError(Exception):
    pass


@dataclass
class Run:
    path: str
    logs: list[dict]  # runs.read_metrics's records, in iteration order
    evals: list[dict]
    settings: dict | None  # config.json's settings and world_size; None where unknown
    params: int | None  # as recorded in config.json; None: counted from the settings when needed


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def load_run(path: str) -> Run | None:
    # None (with a note) for a folder without a metrics.jsonl, so that `out/*` may hold other things
    if os.path.isfile(path):
        note(f"skipping {path}: a file, not a run folder")
        return None
    if not os.path.isdir(path):
        raise PlotError(f"{path}: no such folder (give train.py's out_dir)")
    if not os.path.isfile(os.path.join(path, "metrics.jsonl")):
        note(f"skipping {path}: no metrics.jsonl (not a train.py out_dir, or nothing logged yet)")
        return None
    try:
        logs, evals, skipped = runs.read_metrics(path)
    except OSError as e:
        raise PlotError(f"cannot read {path}/metrics.jsonl: {e.strerror or e}") from None
    if skipped:
        note(f"{path}/metrics.jsonl: skipped {skipped} damaged line(s)")
    settings, params = None, None
    try:
        info = runs.read_run_info(path)
        if info is not None:
            settings, params = {**info["config"], "world_size": info.get("world_size", 1)}, info.get("params")
    except (OSError, ValueError, KeyError, TypeError) as e:
        note(f"{path}/config.json is unreadable ({type(e).__name__}); the run's settings are unknown")
    else:
        if info is None:
            note(f"{path} has no config.json; the run's settings are unknown")
    return Run(path, logs, evals, settings, params)


def ema(values: list[float], weight: float) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else weight * avg + (1 - weight) * v
        out.append(avg)
    return out


def smoothing_weight(n_points: int) -> float:
    # an exponential average's weight W on the past makes it span about 1 / (1 - W) points
    return max(0.0, 1 - 1 / (SPAN * n_points)) if n_points else 0.0


def train_seconds(logs: list[dict]) -> list[float]:
    # the training time up to each log line: a line's ms/iter is train.py's mean over the iterations since
    # the previous line, timed without evals and checkpoints; a recorded "elapsed_s" is taken as it is
    out, t, prev = [], 0.0, 0
    for r in logs:
        t = r["elapsed_s"] if "elapsed_s" in r else t + r["dt_ms"] / 1000 * (r["iter"] - prev)
        out.append(t)
        prev = r["iter"]
    return out


def x_values(run: Run, records: list[dict], x: str) -> np.ndarray:
    # x: "iter" or "tokens" (fields of every record), or "time" in seconds
    if x != "time":
        return np.array([r[x] for r in records], dtype=float)
    # an eval between two log lines is placed at its iteration within their timing window
    knots = [0] + [r["iter"] for r in run.logs]
    return np.interp([r["iter"] for r in records], knots, [0.0] + train_seconds(run.logs))


def short(v) -> str:
    # 3e-4 rather than 0.0003: small values read as they are typed
    if isinstance(v, float) and v != 0 and abs(v) < 1e-2:
        mantissa, exponent = f"{v:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def derived(s: dict, key: str) -> bool:
    if key not in DERIVED:
        return False
    source, factor = DERIVED[key]
    try:
        return math.isclose(s[key], s[source] * factor)
    except (KeyError, TypeError):  # not in this run's config, or None
        return False


def differing_settings(settings: list[dict]) -> list[str]:
    def shown(key):
        if key in IGNORED or key.startswith("wandb_"):
            return False
        values = [s.get(key) for s in settings]
        return any(v != values[0] for v in values) and not all(derived(s, key) for s in settings)

    return [k for k in dict.fromkeys(k for s in settings for k in s) if shown(k)]


def run_labels(loaded: list[Run]) -> list[str]:
    keys = differing_settings([r.settings for r in loaded if r.settings is not None])
    labels = []
    for r in loaded:
        parts = [f"{k}={short(r.settings[k])}" for k in keys if r.settings and k in r.settings]
        labels.append(r.path + (f" ({', '.join(parts)})" if parts else ""))
    return labels


def import_figure():
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, renders with Agg anywhere
    except ImportError:
        raise PlotError("the figure needs matplotlib: pip install matplotlib "
                        "(--table works without it)") from None
    return Figure


def parse_limits(text: str, option: str, time: bool = False) -> tuple[float | None, float | None]:
    """--xlim / --ylim's "LO,HI" (either may be left out: ",5000", "1000,") -> (lo, hi), None where left out;
    on the time axis in seconds."""
    suffixes = TIME_SUFFIXES if time else SUFFIXES
    parts = text.split(",")
    if len(parts) != 2:
        raise PlotError(f"--{option}={text}: give LO,HI, e.g. --{option}=0,5000 (either may be left out: "
                        ",5000)")
    limits = []
    for part in map(str.strip, parts):
        m = re.fullmatch(r"([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*([a-zA-Z]*)", part)
        if part and not (m and (m[2] in suffixes or not m[2])):
            raise PlotError(f"--{option}={text}: {part!r} is not a number (suffixes: {', '.join(suffixes)})")
        limits.append(float(m[1]) * suffixes.get(m[2], 1) if part else None)
    if None not in limits and limits[0] >= limits[1]:
        raise PlotError(f"--{option}={text}: the first value must be below the second")
    return limits[0], limits[1]


def make_figure(loaded: list[Run], x: str = "iter", log: bool = False, smooth: float | None = None,
                xlim=(None, None), ylim=(None, None)):
    # xlim (in iterations, tokens or seconds) keeps the points inside it, so that each panel's y axis fits
    # what is shown; ylim sets the loss axis
    Figure = import_figure()
    from matplotlib.ticker import EngFormatter, FormatStrFormatter

    labels = [textwrap.fill(label, LEGEND_CHARS, subsequent_indent="    ") for label in run_labels(loaded)]
    legend_lines = sum(label.count("\n") + 1 for label in labels)
    fig = Figure(figsize=(10, 8 + LEGEND_LINE_IN * legend_lines), layout="constrained")
    ax_loss, ax_lr, ax_speed = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1, 1]})
    lo, hi = (-np.inf if xlim[0] is None else xlim[0]), (np.inf if xlim[1] is None else xlim[1])
    seconds = min(hi, max((train_seconds(r.logs)[-1] for r in loaded if r.logs), default=0)) - max(lo, 0)
    scale, unit = (3600, "h") if seconds > 7200 else (60, "min") if seconds > 120 else (1, "s")
    div = scale if x == "time" else 1
    for i, (run, label) in enumerate(zip(loaded, labels)):
        color = f"C{i % 10}"
        at, losses = x_values(run, run.logs, x), np.array([r["loss"] for r in run.logs], dtype=float)
        weight = smoothing_weight(len(losses)) if smooth is None else smooth
        smoothed = np.array(ema(losses, weight))  # over the whole run: zooming in does not change it
        lr = np.array([r["lr"] for r in run.logs], dtype=float)
        # a first step: untimed
        speed = np.array([np.nan if r.get("tok_per_s") is None else r["tok_per_s"] for r in run.logs],
                         dtype=float)
        val_at, val = x_values(run, run.evals, x), np.array([r["val_loss"] for r in run.evals], dtype=float)
        shown, val_shown = (at >= lo) & (at <= hi), (val_at >= lo) & (val_at <= hi)
        at, val_at = at[shown] / div, val_at[val_shown] / div
        # gid names each series, so that it can be found in the figure: "out_dir:field"
        ax_loss.plot(at, losses[shown], color=color, alpha=0.25, lw=0.8, gid=f"{run.path}:loss")
        ax_loss.plot(at, smoothed[shown], color=color, lw=1.6, label=label, gid=f"{run.path}:loss_smooth")
        ax_loss.plot(val_at, val[val_shown], "o--", color=color, ms=4, gid=f"{run.path}:val_loss")
        ax_lr.plot(at, lr[shown], color=color, gid=f"{run.path}:lr")
        ax_speed.plot(at, speed[shown], color=color, gid=f"{run.path}:tok_per_s")
    ax_speed.set_xlim(*(None if v is None else v / div for v in xlim))  # (the panels share the x axis)
    ax_loss.set_ylim(*ylim)
    average = f"over the last {SPAN:.0%} of each run" if smooth is None else f"weight {smooth:g}"
    ax_loss.set_title(f"train loss (moving average {average}; raw faint) and val loss (o--)",
                      fontsize="medium")
    ax_loss.set_ylabel("loss")
    if log:
        ax_loss.set_yscale("log")
        for axis in (ax_loss.yaxis.set_major_formatter, ax_loss.yaxis.set_minor_formatter):
            axis(FormatStrFormatter("%g"))  # 0.6, 2, 3 rather than 6 x 10^-1, 2 x 10^0
    fig.legend(loc="outside lower center", fontsize="small")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))  # 1e-3 and its multiples
    ax_speed.set_ylabel("tokens/s")
    ax_speed.yaxis.set_major_formatter(EngFormatter())
    if x == "tokens":
        ax_speed.xaxis.set_major_formatter(EngFormatter())
    ax_speed.set_xlabel({"iter": "iteration", "tokens": "tokens", "time": f"training time ({unit})"}[x])
    for ax in (ax_loss, ax_lr, ax_speed):
        ax.grid(alpha=0.3)
    return fig


def count_params(settings: dict) -> int | None:
    from model import ModelArgs

    try:
        return ModelArgs.from_dict(settings).num_params()
    except (TypeError, ValueError):
        return None


def si(n) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def table_row(run: Run) -> list[str]:
    params = run.params or (count_params(run.settings) if run.settings else None)
    tokens = max((r["tokens"] for r in run.logs + run.evals), default=0)
    best = min(run.evals, key=lambda r: r["val_loss"], default=None)
    row = [run.path, si(params) if params else "-", si(tokens), f"{tokens / params:.3g}" if params else "-"]
    row += [f"{best['val_loss']:.4f}", str(best["iter"]), si(best["tokens"])] if best else ["-"] * 3
    if not run.logs:
        return row + ["-"] * 4
    seconds = train_seconds(run.logs)
    # each log line's training window: its iterations at its ms/iter (a first step, untimed, has no tok/s)
    iters = np.diff([0] + [r["iter"] for r in run.logs])
    timed = [(n * r["dt_ms"] / 1000, n * r["tok_per_s"] * r["dt_ms"] / 1000, r.get("mfu"))
             for n, r in zip(iters, run.logs) if r.get("tok_per_s")]
    span = sum(t for t, _, _ in timed)
    mfu = [(m, t) for t, _, m in timed if m is not None]
    row += [f"{run.logs[-1]['loss']:.4f}", runs.format_duration(seconds[-1]),
            f"{sum(n for _, n, _ in timed) / span:,.0f}" if span > 0 else "-",
            f"{100 * sum(m * t for m, t in mfu) / sum(t for _, t in mfu):.1f}%" if mfu else "-"]
    return row


def table(loaded: list[Run]) -> str:
    header = ["run", "params", "tokens", "tok/param", "best val", "at iter", "at tokens", "last loss", "time",
              "tok/s", "MFU"]
    rows = [header] + [table_row(r) for r in loaded]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    # the run's name to the left, the numbers to the right
    lines = ["  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])])
             for row in rows]
    return "\n".join([TABLE_NOTE, ""] + lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="plot.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dirs", nargs="*", metavar="OUT_DIR", help="train.py's out_dir of each run")
    p.add_argument("-o", "--output", default="runs.png",
                   help="the figure's file (.png, .pdf, .svg); default runs.png")
    p.add_argument("--x", choices=("iter", "tokens", "time"), default="iter", help="the x axis; default iter")
    p.add_argument("--log", action="store_true", help="a log-scale loss axis")
    p.add_argument("--xlim", metavar="LO,HI", default=",",
                   help="zoom in on part of the x axis, in its units: --xlim=0,5000 (iterations), "
                        "--x=tokens --xlim=0,2000M, --x=time --xlim=,2h (s, min, h); either side may be left "
                        "out")
    p.add_argument("--ylim", metavar="LO,HI", default=",", help="the loss axis' range, e.g. --ylim=1,3")
    p.add_argument("--smooth", type=float, metavar="W",
                   help="the moving average's weight on the past, in [0, 1); default: see above")
    p.add_argument("--table", action="store_true", help="print a table of the runs instead of drawing them")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not args.out_dirs:
            raise PlotError("give one or more run folders (train.py's out_dir), "
                            "e.g. python plot.py out/15m out/42m")
        if args.smooth is not None and not 0 <= args.smooth < 1:
            raise PlotError(f"--smooth={args.smooth} must be in [0, 1) (0 = no smoothing)")
        xlim = parse_limits(args.xlim, "xlim", time=args.x == "time")
        ylim = parse_limits(args.ylim, "ylim")
        if args.log and ylim[0] is not None and ylim[0] <= 0:
            raise PlotError(f"--ylim={args.ylim}: a log-scale axis starts above 0")
        loaded = [r for r in (load_run(os.path.normpath(p)) for p in args.out_dirs) if r is not None]
        if not loaded:
            raise PlotError("none of the folders given holds a training run's metrics.jsonl")
        if args.table:
            print(table(loaded))
            return
        fig = make_figure(loaded, args.x, args.log, args.smooth, xlim, ylim)
        try:
            fig.savefig(args.output, dpi=100)
        except (OSError, ValueError) as e:  # no such folder; an extension matplotlib cannot write
            raise PlotError(f"cannot write {args.output}: {str(e).splitlines()[0]}") from None
        print(f"wrote {args.output} ({len(loaded)} run(s))")
    except PlotError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
