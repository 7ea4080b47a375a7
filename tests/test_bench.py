"""The benchmark scripts are run by hand, not timed here; what they must get right is checked on a CPU."""
import math
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_recipe  # noqa: E402
import bench_train  # noqa: E402

import settings  # noqa: E402
import train  # noqa: E402


@pytest.mark.slow  # dynamo traces the 260K model twice
def test_bench_train_compiles_each_config_afresh_with_static_shapes(monkeypatch):
    # four configs in one process: without a reset the 2nd-4th recompile with dynamic shapes, so their
    # figures would not be the static graph a user's run compiles
    events, real_compile = [], torch.compile
    monkeypatch.setattr(torch._dynamo, "reset", lambda: events.append("reset"))

    def compile(model, **kwargs):
        events.append(("compile", kwargs.get("dynamic")))
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile)
    args = bench_train.parse_args(["--compile", "--device", "cpu", "--batch_size", "1", "--iters", "1",
                                   "--warmup", "1"])
    for name in ("260k", "260k"):
        assert bench_train.bench_config(name, args)["tok_s"] > 0
    assert events == ["reset", ("compile", False)] * 2


def test_gpu_check_reports_a_kernel_for_every_call_site(capsys):
    import gpu_check

    gpu_check.main(["--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == 4  # two shapes x float32, bfloat16 (no float16 on CPU)
    for line in lines:
        assert "training=flash" in line and "prefill=flash" in line and "decode=flash" in line, line


def test_bench_train_peer_mode_reads_our_train_py_on_its_shards(tmp_path):
    # the side-by-side bench runs train.py on the shards it writes and reads the time per iteration from
    # its log: both must keep working as train.py changes (llama2.c's side needs its checkout: run by hand)
    shape = dict(bench_train.PEER_SHAPES["260k"], dim=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32,
                 batch_size=2)
    bench_train.write_shards(tmp_path / "data", shape, n_tokens=4096)
    args = bench_train.parse_args(["--peer", str(tmp_path), "--iters", "2", "--warmup", "1",
                                   "--threads", "1"])
    ms, first_loss = bench_train.run_train("ours", shape, args, tmp_path)
    assert ms > 0 and abs(first_loss - math.log(512)) < 0.5  # random tokens: about ln(vocab)


def test_bench_recipe_holds_out_whole_stories_and_its_recipes_are_valid_settings(tmp_path):
    stories = [f"Story {i}.\nIt ends here." for i in range(25)]
    text = tmp_path / "stories.txt"
    text.write_text("".join(s + "\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    train_txt, valid_txt = bench_recipe.split_stories(str(text), str(tmp_path))
    read = [[s.strip() for s in open(f, encoding="utf-8").read().split("<|endoftext|>") if s.strip()]
            for f in (train_txt, valid_txt)]
    assert read[1] == [stories[i] for i in (9, 19)] and sorted(read[0] + read[1]) == sorted(stories)
    for size, shape in bench_recipe.SHAPES.items():
        for recipe, expected in ((bench_recipe.OLD[size], ("adamw", "cosine")),
                                 (bench_recipe.NEW[size], ("muon", "wsd"))):
            c = settings.resolve_config(train.parse_settings(shape + recipe))
            assert (c["optimizer"], c["lr_schedule"]) == expected
