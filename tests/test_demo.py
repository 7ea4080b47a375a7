"""demo.py, the offline quick start: its help, and the commands it runs (the run itself is
test_end_to_end.py's)."""
import pytest
from conftest import ROOT

import demo
import train


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage(capsys, flag):
    demo.main([flag])
    out = capsys.readouterr().out
    assert out.startswith("The offline quick start") and "python demo.py --max_iters=100" in out


def test_a_second_demo_replaces_the_first_run_and_settings_reach_train_py(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(demo, "run", lambda *args: ran.append(args))
    demo.main(["--max_iters=30", "--out_dir=out/mine"])
    scripts = [args[0] for args in ran]
    assert scripts[-2:] == ["train.py", "sample.py"]
    train_args = list(ran[-2][1:])
    # a new model in place of the last demo's; the user's settings last, so that they win
    assert train_args == ["config/train_cpu_debug.py", "--overwrite=True", "--max_iters=30",
                          "--out_dir=out/mine"]
    monkeypatch.chdir(ROOT)
    c = train.parse_settings(train_args)
    assert c["overwrite"] is True and c["max_iters"] == 30 and c["out_dir"] == "out/mine"
    assert "--checkpoint=out/mine/ckpt.pt" in ran[-1]
    # --overwrite=False is yours to give: then a second demo stops, as train.py does, with what to do
    ran.clear()
    demo.main(["--overwrite=False"])
    assert train.parse_settings(list(ran[-2][1:]))["overwrite"] is False


def test_other_arguments_are_a_one_line_error(monkeypatch):
    monkeypatch.setattr(demo, "run", lambda *args: pytest.fail("ran a step"))
    with pytest.raises(SystemExit) as e:
        demo.main(["--max_iters", "30"])
    assert e.value.code == "error: demo.py takes only --key=value settings for train.py, not '--max_iters'"
