"""The benchmark scripts are run by hand, not timed here; what they must get right is checked on a CPU."""
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import tinystories
from llamatiny.corpus import make_stories, write_endoftext, write_tinystories_archive

sys.path.insert(0, str(ROOT / "bench"))
import bench_recipe  # noqa: E402
import bench_threads  # noqa: E402
import bench_train  # noqa: E402
import gpu_check  # noqa: E402

import train  # noqa: E402
from llamatiny import settings  # noqa: E402


@pytest.mark.slow  # dynamo traces the 260K model twice
def test_bench_train_compiles_each_config_afresh_with_static_shapes(monkeypatch):
    # four configs in one process: without a reset the 2nd-4th recompile with dynamic shapes, so their
    # figures would not be the static graph a user's run compiles
    events, real_compile = [], torch.compile
    monkeypatch.setattr(torch._dynamo, "reset", lambda: events.append("reset"))

    def compile(model, **kwargs):
        events.append(("compile", kwargs))
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile)
    args = bench_train.parse_args(["--compile", "--device", "cpu", "--batch_size", "1", "--iters", "1",
                                   "--warmup", "1"])
    for name in ("260k", "260k"):
        assert bench_train.bench_config(name, args)["tok_s"] > 0
    # compiled as train.py compiles it (no options), so that train.py at the same shape hits the cache
    assert events == ["reset", ("compile", {})] * 2


def test_bench_train_gives_a_failing_config_its_row_and_goes_on(monkeypatch, capsys):
    # a compile error, an out-of-memory or anything else in one config must not cost the others' rows
    real = bench_train.bench_config

    def bench_config(name, args):
        if name == "15m":
            raise RuntimeError("backend='inductor' raised: fatal error: Python.h | no such file\nmore lines")
        return real(name, args)

    monkeypatch.setattr(bench_train, "bench_config", bench_config)
    bench_train.main(["--device", "cpu", "--configs", "15m,42m", "--batch_size", "1", "--iters", "1",
                      "--warmup", "1", "--dim=32", "--n_layers=1", "--n_heads=2", "--n_kv_heads=2",
                      "--max_seq_len=16", "--vocab_size=64"])
    captured = capsys.readouterr()
    rows = [line for line in captured.out.splitlines() if line.startswith(("| 15m", "| 42m"))]
    assert rows[0] == ("| 15m | | RuntimeError: backend='inductor' raised: fatal error: Python.h / "
                       "no such file | | | | | |")
    assert re.match(r"^\| 42m \| 0\.\d\dM \| 1x16x1 \| [\d.]+ \| [\d,]+ \|", rows[1]), rows[1]
    assert "Traceback" in captured.err


def test_bench_train_refuses_a_misspelt_setting(capsys):
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--configs", "15m", "--n_layer=1"])
    assert "did you mean 'n_layers'" in capsys.readouterr().err


def test_gpu_check_reports_a_kernel_for_every_call_site():
    lines = gpu_check.report("cpu")
    assert len(lines) == 4  # two shapes x float32, bfloat16 (no float16 on CPU)
    for line in lines:
        assert "training=flash" in line and "prefill=flash" in line and "decode=flash" in line, line


def test_the_compile_smoke_test_turns_compile_off_with_the_reason(monkeypatch):
    # what torch.compile does here decides --compile for the GPU run. Compiling takes minutes on this CPU, so
    # the compiler is stood in for: by the eager model, by one that cannot build its kernels, by a wrong one
    monkeypatch.setattr(torch, "compile", lambda model: model)
    works, why = gpu_check.compile_smoke_test("cpu")
    assert works and re.fullmatch(r"a 2-layer model's float32 training step compiled in \d+\.\d s; its loss "
                                  r"(\d\.\d{4}) matches eager's \1", why), why

    def cannot_build(model):
        def run(*args):
            raise RuntimeError("fatal error: Python.h: No such file or directory\ncompilation terminated.")
        return run

    monkeypatch.setattr(torch, "compile", cannot_build)
    assert gpu_check.compile_smoke_test("cpu") == (False, "torch.compile failed: RuntimeError: fatal error: "
                                                          "Python.h: No such file or directory")

    def wrong(model):
        return lambda x, y: (None, model(x, y)[1] * 1.1)

    monkeypatch.setattr(torch, "compile", wrong)
    works, why = gpu_check.compile_smoke_test("cpu")
    assert not works, why
    assert re.fullmatch(r"the compiled model's loss [\d.]+ differs from eager's [\d.]+", why), why


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


@pytest.mark.slow  # every step of the GPU run, each a process of its own: about a minute
def test_the_gpu_run_goes_through_every_step_on_the_cpu(tmp_path):
    # bench/gpu_run.sh's dry run: its steps at toy sizes on the CPU, so that a step that breaks is found here
    # and not in the GPU's minutes. What gpu_prepare.sh carries is made from the fixture corpus: its stories
    # as TinyStories' JSON shards in their archive, and a 512-token tokenizer in the Llama 2 tokenizer's place
    shared = tmp_path / "shared"
    (shared / "data" / "tinystories").mkdir(parents=True)
    (shared / "tokenizers").mkdir()
    stories = make_stories(600, seed=1)
    sample = shared / "data" / "tinystories" / "TinyStories_all_data_sample.tar.gz"
    write_tinystories_archive(sample, stories, shards=3)
    write_endoftext(tmp_path / "stories.txt", stories)
    tokenizer = tinystories.train_vocab(tmp_path, 512, input=tmp_path / "stories.txt", name="fixture")
    shutil.copy(tokenizer, shared / "tokenizers" / "llama2.model")
    out = tmp_path / "out"
    env = {**os.environ, "GPU_RUN_CARRIED": str(tmp_path / "carried"), "OUT": str(out), "GPU_RUN_DRY": "1",
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    prepared = subprocess.run(["bash", str(ROOT / "bench" / "gpu_prepare.sh"), str(shared)], env=env,
                              capture_output=True, text=True, timeout=60)
    assert prepared.returncode == 0, prepared.stderr
    assert re.search(r"^carry .*carried \(\d+K\):$", prepared.stdout, re.M), prepared.stdout
    assert "llama2.model" in prepared.stdout and "TinyStories_all_data_sample.tar.gz" in prepared.stdout

    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh")], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert result.stdout.rstrip().endswith(summary.rstrip())  # the summary is the last thing printed
    steps = [line for line in summary.splitlines() if line.startswith("- ")]
    assert len(steps) == 10 and all(re.fullmatch(r"- .+: ok, \d+ s", line) for line in steps), steps
    assert "\ncompile: off (the smoke test was skipped)\n" in summary
    for config in ("15m", "42m", "110m"):  # every config measured, at the toy size
        assert re.search(rf"^\| {config} \| 0\.\d\dM \| 2x32x1 \| [\d.]+ \| [\d,]+ \|", summary, re.M)
    assert re.search(r"^tests/test_gpu\.py -m gpu: \d+ skipped", summary, re.M)  # no GPU here
    assert re.search(r"^15M bf16 compile=False: iter 1 \| .* \| first step \d+\.\d s \|", summary, re.M)
    assert re.search(r"^15M fp16 resumed: iter 60 \| loss \d\.\d{4} ", summary, re.M)
    assert re.search(r"^sample\.py on it: \d+ tokens in [\d.]+ s: [\d.]+ tokens/s$", summary, re.M)
    assert re.search(r"^torchrun, 15M, compile=False: iter 10 \| ", summary, re.M)
    assert re.search(r"^decoding: model\.generate +[\d.]+ / ", summary, re.M)
    # what comes back from a GPU machine: at most 8 files, at most 2 folders down: logs, metrics and configs
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["15m/config.json", "15m/metrics.jsonl", "ddp/config.json", "ddp/metrics.jsonl",
                     "gpu_run.log", "summary.md"]


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


def test_bench_threads_times_training_and_decoding_steps():
    # the two steps bench_threads.py alternates thread counts over run as the bench calls them (a training
    # step of the 260K shape; 3 tokens of the 15M shape's decoding, on weights packed once, at load)
    step, tokens, what = bench_threads.train_step(batch_size=1)
    step()
    assert tokens == 512 and "260K" in what
    decode, new_tokens, what = bench_threads.decode_step(new_tokens=3)
    decode()
    assert new_tokens == 3 and "15M" in what
