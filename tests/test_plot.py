import json
import re
import sys

import matplotlib
import pytest
from test_train import ok, run_train

import plot
from llamatiny import runs
from model import ModelArgs, Transformer

matplotlib.use("Agg")

# a resolved train.py config, the fields plot.py looks at
SETTINGS = {"out_dir": "out", "data_dir": "data", "init_from": "scratch", "device": "cpu", "wandb_log": False,
            "wandb_project": "llama-tiny", "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
            "vocab_size": 512, "hidden_dim": None, "multiple_of": 16, "max_seq_len": 32, "dropout": 0.0,
            "batch_size": 8, "learning_rate": 1e-3, "min_lr": 1e-4, "max_iters": 100, "lr_decay_iters": 100,
            "seed": 1337}
COLUMNS = ("run", "params", "tokens", "tok/param", "best val", "at iter", "at tokens", "last loss", "time",
           "tok/s", "MFU")


def write_run(out_dir, records, world_size=1, **settings):
    # records: dicts, or raw text for a damaged line
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"config": {**SETTINGS, "out_dir": str(out_dir), **settings}, "world_size": world_size}
    (out_dir / "config.json").write_text(json.dumps(info), encoding="utf-8")
    text = "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records)
    (out_dir / "metrics.jsonl").write_text(text, encoding="utf-8")
    return str(out_dir)


def log(it, loss, dt_ms=100.0, lr=1e-3, mfu=None, tokens_per_iter=1000, **extra):
    return {"iter": it, "tokens": it * tokens_per_iter, "loss": loss, "lr": lr, "grad_norm": 1.0,
            "dt_ms": dt_ms, "tok_per_s": tokens_per_iter / dt_ms * 1000, "mfu": mfu, **extra}


def ev(it, val_loss, tokens_per_iter=1000):
    return {"iter": it, "tokens": it * tokens_per_iter, "train_loss": val_loss - 0.1, "val_loss": val_loss}


def render(monkeypatch, tmp_path, *argv) -> dict:
    # plot.main writes the PNG; the figure it drew comes back as {gid: (x, y)} of its lines, with the legend,
    # the panels' axis limits and the figure itself
    drawn = []
    make_figure = plot.make_figure
    monkeypatch.setattr(plot, "make_figure", lambda *a: drawn.append(make_figure(*a)) or drawn[-1])
    png = tmp_path / "runs.png"
    plot.main([*argv, "-o", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = drawn
    series = {line.get_gid(): (list(line.get_xdata()), list(line.get_ydata()))
              for ax in fig.axes for line in ax.get_lines()}
    series["legend"] = [t.get_text() for t in fig.legends[0].get_texts()]
    series["loss axis"] = fig.axes[0].get_yscale()
    series["xlim"] = [ax.get_xlim() for ax in fig.axes]
    series["ylim"] = [ax.get_ylim() for ax in fig.axes]
    series["figure"] = fig
    return series


def table_rows(capsys, *argv) -> dict:
    # {run: {column: cell}}
    capsys.readouterr()
    plot.main([*argv, "--table"])
    text = capsys.readouterr().out
    assert text.startswith(plot.TABLE_NOTE + "\n\n")
    header, *rows = text.removeprefix(plot.TABLE_NOTE + "\n\n").splitlines()
    assert header.split() == " ".join(COLUMNS).split()
    return {row.split()[0]: dict(zip(COLUMNS, row.split())) for row in rows}


# ----------------------------------------------------------------------------- reading the run folder


def test_a_resumed_run_reads_as_one_history_without_the_abandoned_lines(tmp_path, capsys):
    # an attempt logged up to iteration 10 and was killed; a run resumed from the checkpoint at 4 reached 8
    first = [log(2, 5.0), log(4, 4.0), ev(4, 4.2), log(6, 3.0), log(8, 2.5), ev(8, 2.9), log(10, 2.0)]
    resumed = [log(6, 3.1), log(8, 2.6), ev(8, 3.0), '{"iter": 10, "tokens": 10000, "loss": 2.']  # cut short
    out = write_run(tmp_path / "run", first + resumed)
    logs, evals, skipped = runs.read_metrics(out)
    assert [(r["iter"], r["loss"]) for r in logs] == [(2, 5.0), (4, 4.0), (6, 3.1), (8, 2.6)]
    assert [(r["iter"], r["val_loss"]) for r in evals] == [(4, 4.2), (8, 3.0)]
    assert skipped == 1
    assert runs.read_run_info(out)["config"]["dim"] == 32
    assert runs.read_run_info(tmp_path) is None


def test_the_figure_plots_the_records_with_the_moving_average(monkeypatch, tmp_path, capsys):
    out = write_run(tmp_path / "run", [log(2, 4.0, lr=1e-4), log(4, 2.0, lr=2e-4, dt_ms=200.0), ev(4, 2.5),
                                       log(6, 1.0, lr=3e-4), ev(6, 1.5), log(8, 1.0), log(8, 3.0),
                                       '{"iter": 9, "tok'])
    lines = render(monkeypatch, tmp_path, out, "--smooth=0.75")
    assert "skipped 1 damaged line" in capsys.readouterr().err
    assert lines[f"{out}:loss"] == ([2, 4, 6, 8], [4.0, 2.0, 1.0, 3.0])  # iteration 8 as it was logged last
    # each point: 3/4 of the average before it + 1/4 of its loss
    assert lines[f"{out}:loss_smooth"] == ([2, 4, 6, 8], [4.0, 3.5, 2.875, 2.90625])
    assert lines[f"{out}:val_loss"] == ([4, 6], [2.5, 1.5])
    assert lines[f"{out}:lr"][1] == [1e-4, 2e-4, 3e-4, 1e-3]
    assert lines[f"{out}:tok_per_s"][1] == [10_000, 5_000, 10_000, 10_000]
    assert lines["legend"] == [out]  # one run: nothing differs
    # by default the average spans 2% of the points: 100 points, W = 1 - 1 / 2
    write_run(tmp_path / "run", [log(1, 4.0), log(2, 2.0)] + [log(i, 1.0) for i in range(3, 101)])
    assert render(monkeypatch, tmp_path, out)[f"{out}:loss_smooth"][1][:5] == [4.0, 3.0, 2.0, 1.5, 1.25]


def test_the_x_axis_in_tokens_and_in_training_time(monkeypatch, tmp_path):
    # ms/iter is the mean since the previous log line: 5 x 0.1 s, then 5 x 0.2 s, then 2 x 0.05 s
    records = [log(5, 3.0, dt_ms=100.0, tokens_per_iter=64), ev(8, 2.0, tokens_per_iter=64),
               log(10, 2.0, dt_ms=200.0, tokens_per_iter=64), log(12, 1.0, dt_ms=50.0, tokens_per_iter=64)]
    out = write_run(tmp_path / "run", records)
    lines = render(monkeypatch, tmp_path, out, "--x=tokens", "--log")
    assert lines[f"{out}:loss"][0] == [320, 640, 768] and lines[f"{out}:val_loss"][0] == [512]
    assert lines["loss axis"] == "log" and render(monkeypatch, tmp_path, out)["loss axis"] == "linear"
    lines = render(monkeypatch, tmp_path, out, "--x=time")
    assert lines[f"{out}:loss"][0] == pytest.approx([0.5, 1.5, 1.6])
    assert lines[f"{out}:val_loss"][0] == pytest.approx([0.5 + 3 * 0.2])  # 3 iterations into the 0.2 s window
    # a recorded training time is taken as it is
    write_run(tmp_path / "run", records[:2] + [log(10, 2.0, dt_ms=200.0, elapsed_s=7.0)])
    assert render(monkeypatch, tmp_path, out, "--x=time")[f"{out}:loss"][0] == pytest.approx([0.5, 7.0])


def test_a_run_in_progress_without_an_eval_yet(monkeypatch, tmp_path, capsys):
    out = write_run(tmp_path / "run", [log(1, 6.0), log(2, 5.5)])
    lines = render(monkeypatch, tmp_path, out)
    assert lines[f"{out}:loss"] == ([1, 2], [6.0, 5.5]) and lines[f"{out}:val_loss"] == ([], [])
    row = table_rows(capsys, out)[out]
    assert (row["best val"], row["at iter"], row["last loss"]) == ("-", "-", "5.5000")


def test_the_legend_names_the_settings_that_differ(monkeypatch, tmp_path):
    # out_dir and device differ too, and min_lr / lr_decay_iters follow learning_rate / max_iters: not named
    a = write_run(tmp_path / "a", [log(1, 5.0)], learning_rate=3e-4, min_lr=3e-5, device="cuda:0")
    b = write_run(tmp_path / "b", [log(1, 5.0)], learning_rate=1e-3, min_lr=1e-4)
    c = write_run(tmp_path / "c", [log(1, 5.0)], max_iters=200, lr_decay_iters=200, world_size=2)
    unwrapped = lambda labels: [" ".join(label.split()) for label in labels]  # long ones wrap (tmp_path's)
    assert unwrapped(render(monkeypatch, tmp_path, a, b, c)["legend"]) == [
        f"{a} (learning_rate=3e-4, max_iters=100, world_size=1)",
        f"{b} (learning_rate=1e-3, max_iters=100, world_size=1)",
        f"{c} (learning_rate=1e-3, max_iters=200, world_size=2)"]
    d = write_run(tmp_path / "d", [log(1, 5.0)], min_lr=0.0)  # set apart from the rule: named
    assert unwrapped(render(monkeypatch, tmp_path, b, d)["legend"]) == [f"{b} (min_lr=1e-4)",
                                                                       f"{d} (min_lr=0)"]


@pytest.mark.parametrize("x, xlim, window", [
    ("iter", "--xlim=20,60", (20, 60)),
    ("tokens", "--xlim=20K,60K", (20_000, 60_000)),
    ("time", "--xlim=2s,6", (2, 6)),  # 1,000 tokens per iteration at 0.1 s each: iterations 20 to 60
])
def test_xlim_zooms_every_panel_of_every_x_axis(monkeypatch, tmp_path, x, xlim, window):
    # a loss falling from 11 to 1 over 100 iterations, a learning rate rising to 100 over them
    records = [[log(i, 11 - i / 10, lr=float(i))] + ([ev(i, 11 - i / 10)] if i % 10 == 0 else [])
               for i in range(1, 101)]
    out = write_run(tmp_path / "run", sum(records, []))
    lines = render(monkeypatch, tmp_path, out, f"--x={x}", xlim)
    assert lines["xlim"] == [window] * 3
    # only the points inside are drawn, so that each panel's y axis fits them: losses 9 to 5, lr 20 to 60
    for series in ("loss", "loss_smooth", "val_loss", "lr", "tok_per_s"):
        shown = lines[f"{out}:{series}"][0]
        assert shown and all(window[0] <= v <= window[1] for v in shown)
    assert lines[f"{out}:loss"][1] == pytest.approx([11 - i / 10 for i in range(20, 61)])
    (loss_low, loss_high), (lr_low, lr_high), _ = lines["ylim"]
    assert 4 < loss_low < 5 and 9 < loss_high < 10 and 15 < lr_low < 20 and 60 < lr_high < 65
    # the moving average is the whole run's, cut to the window, not one restarted at its edge
    whole = render(monkeypatch, tmp_path, out, f"--x={x}")[f"{out}:loss_smooth"][1]
    assert lines[f"{out}:loss_smooth"][1] == whole[19:60]
    # one side, and the loss axis set by hand
    lines = render(monkeypatch, tmp_path, out, f"--x={x}", xlim.split(",")[0] + ",", "--ylim=1,3")
    assert lines["xlim"][0][0] == window[0] and lines["xlim"][0][1] > window[1] and lines["ylim"][0] == (1, 3)


def test_the_time_axis_unit_follows_the_window(monkeypatch, tmp_path):
    # 100 iterations of 100 s: 10,000 s in all, shown in hours; its first 10 minutes in minutes
    out = write_run(tmp_path / "run", [log(i, 5.0, dt_ms=100_000.0) for i in range(1, 101)])
    lines = render(monkeypatch, tmp_path, out, "--x=time")
    assert lines["figure"].axes[2].get_xlabel() == "training time (h)"
    lines = render(monkeypatch, tmp_path, out, "--x=time", "--xlim=0,10min")
    assert lines["xlim"][0] == (0, 10) and lines["figure"].axes[2].get_xlabel() == "training time (min)"
    assert lines[f"{out}:loss"][0] == pytest.approx([100 / 60 * i for i in range(1, 7)])


def test_the_legend_of_many_dissimilar_runs_stays_whole_below_the_panels(monkeypatch, tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    def panel_heights(fig):
        FigureCanvasAgg(fig).draw()  # lays the figure out
        return [ax.get_window_extent().height for ax in fig.axes]

    settings = [dict(learning_rate=3e-4, batch_size=16), dict(dim=64, n_layers=4, hidden_dim=256),
                dict(dropout=0.1, max_seq_len=64, multiple_of=32), dict(n_heads=8, n_kv_heads=8, seed=1),
                dict(max_iters=200, lr_decay_iters=200, min_lr=0.0), dict(vocab_size=4096, batch_size=4)]
    outs = [write_run(tmp_path / f"run_with_a_long_descriptive_name_{i}", [log(1, 5.0), log(2, 4.0)], **s)
            for i, s in enumerate(settings)]
    lines = render(monkeypatch, tmp_path, *outs)
    fig, legend = lines["figure"], lines["figure"].legends[0]
    assert len(lines["legend"]) == 6 and max(len(line) for label in lines["legend"]
                                              for line in label.split("\n")) <= plot.LEGEND_CHARS
    heights = panel_heights(fig)
    box, lowest = legend.get_window_extent(), fig.axes[2].get_tightbbox()  # (tick labels and title included)
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width and 0 <= box.y0 and box.y1 <= lowest.y0
    # the figure grew for the legend: the panels are as tall as beside a one-run legend
    alone = panel_heights(render(monkeypatch, tmp_path, outs[0])["figure"])
    assert heights == pytest.approx(alone, rel=0.05)


# ----------------------------------------------------------------------------- the table


def test_the_table_figures(tmp_path, capsys):
    params = Transformer(ModelArgs.from_dict(SETTINGS)).num_params()
    records = [log(10, 3.0, dt_ms=100.0, mfu=0.2), ev(10, 2.9), log(20, 2.0, dt_ms=300.0, mfu=0.4),
               ev(20, 2.1), log(30, 1.5, dt_ms=200.0, mfu=0.3), ev(30, 2.2), log(40, 1.25, dt_ms=200.0)]
    a = write_run(tmp_path / "a", records)
    b = write_run(tmp_path / "b", [log(5, 4.0, dt_ms=20_000.0, tokens_per_iter=2_000_000)])
    rows = table_rows(capsys, a, b)
    seconds = 10 * (0.1 + 0.3 + 0.2 + 0.2)
    mfu = (0.2 * 1 + 0.4 * 3 + 0.3 * 2) / 6  # weighted by the time each line stands for; None left out
    assert rows[a] == {"run": a, "params": f"{params / 1e3:.3g}K", "tokens": "40K",
                       "tok/param": f"{40_000 / params:.3g}", "best val": "2.1000", "at iter": "20",
                       "at tokens": "20K", "last loss": "1.2500", "time": runs.format_duration(seconds),
                       "tok/s": f"{40_000 / seconds:,.0f}", "MFU": f"{100 * mfu:.1f}%"}
    assert [rows[b][k] for k in ("tokens", "time", "tok/s", "MFU")] == ["10M", "1m40s", "100,000", "-"]


# ----------------------------------------------------------------------------- the command line


def test_without_matplotlib_the_figure_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    out = write_run(tmp_path / "run", [log(1, 5.0)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit) as e:
        plot.main([out, "-o", str(tmp_path / "runs.png")])
    assert str(e.value.code) == ("error: the figure needs matplotlib: pip install matplotlib "
                                 "(--table works without it)")
    assert not (tmp_path / "runs.png").exists()
    assert table_rows(capsys, out)[out]["last loss"] == "5.0000"


@pytest.mark.parametrize("argv, message", [
    ([], "error: give one or more run folders"),
    (["{tmp}/missing"], "error: {tmp}/missing: no such folder"),
    (["{tmp}/empty"], "error: none of the folders given holds a training run's metrics.jsonl"),
    (["{tmp}/run", "--smooth=1"], "error: --smooth=1.0 must be in [0, 1)"),
    (["{tmp}/run", "-o", "{tmp}/nowhere/runs.png"], "error: cannot write {tmp}/nowhere/runs.png"),
    (["{tmp}/run", "--xlim=5000"], "error: --xlim=5000: give LO,HI, e.g. --xlim=0,5000"),
    (["{tmp}/run", "--xlim=5000,100"], "error: --xlim=5000,100: the first value must be below the second"),
    (["{tmp}/run", "--xlim=0,2h"], "error: --xlim=0,2h: '2h' is not a number (suffixes: k, K, M, B, G)"),
    (["{tmp}/run", "--x=time", "--xlim=0,2M"], "error: --xlim=0,2M: '2M' is not a number (suffixes: s, min"),
    (["{tmp}/run", "--log", "--ylim=0,3"], "error: --ylim=0,3: a log-scale axis starts above 0"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    write_run(tmp_path / "run", [log(1, 5.0)])
    with pytest.raises(SystemExit) as e:
        plot.main([a.format(tmp=tmp_path) for a in argv])
    text = str(e.value.code)
    assert text.startswith(message.format(tmp=tmp_path)) and "\n" not in text


def test_folders_without_a_run_are_skipped_with_a_note(monkeypatch, tmp_path, capsys):
    # out/* also matches the exports and files beside the runs
    (tmp_path / "hf").mkdir()
    (tmp_path / "debug.bin").write_bytes(b"model")
    out = write_run(tmp_path / "run", [log(1, 5.0)])
    (tmp_path / "run" / "config.json").write_text("{not json", encoding="utf-8")
    everything = sorted(str(p) for p in tmp_path.iterdir())
    assert render(monkeypatch, tmp_path, *everything)["legend"] == [out]
    err = capsys.readouterr().err
    assert f"note: skipping {tmp_path / 'hf'}: no metrics.jsonl" in err
    assert f"note: skipping {tmp_path / 'debug.bin'}: a file, not a run folder" in err
    assert f"note: {out}/config.json is unreadable" in err
    assert list(table_rows(capsys, *everything)) == [out]


def test_help_works(capsys):
    with pytest.raises(SystemExit) as e:
        plot.main(["--help"])
    assert e.value.code == 0 and "--table" in capsys.readouterr().out


# ----------------------------------------------------------------------------- a real run


@pytest.mark.slow  # ~10 s on 2 busy cores
def test_a_real_training_run(monkeypatch, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    stdout = ok(run_train(["--max_iters=10", "--eval_interval=5", "--eval_iters=1"], data_dir, out)).stdout
    printed = [(int(i), float(x)) for i, x in re.findall(r"^iter (\d+) \| loss (\d+\.\d+)", stdout, re.M)]
    printed_val = [float(v) for v in re.findall(r"^eval iter \d+: .* val loss (\d+\.\d+)", stdout, re.M)]
    params = int(re.search(r"^model: ([\d,]+) parameters", stdout, re.M).group(1).replace(",", ""))
    lines = render(monkeypatch, tmp_path, str(out))
    iters, losses = lines[f"{out}:loss"]
    assert iters == [i for i, _ in printed] == list(range(1, 11))
    assert losses == pytest.approx([loss for _, loss in printed], abs=5e-5)  # the log prints 4 decimals
    assert lines[f"{out}:val_loss"][0] == [0, 5, 10]  # the fresh model's, then every eval_interval
    assert lines[f"{out}:val_loss"][1] == pytest.approx(printed_val, abs=5e-5)
    row = table_rows(capsys, str(out))[str(out)]
    assert row["params"] == plot.si(params) and row["tok/param"] == f"{10 * 2 * 8 * 32 / params:.3g}"
