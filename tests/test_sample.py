"""sample.py: its settings, streaming text that equals a full decode (byte fallback included),
stopping at the end of a story, determinism under a seed, and one-line errors for bad input (the
sampling filters themselves are tested in test_model.py)."""
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_export import save_checkpoint, tiny_model, train_tokenizer

import sample
from configurator import parse_config
from llamatiny.checkpoint import from_checkpoint, write_hf, write_llama2c
from llamatiny.generate import for_inference, generate_story
from llamatiny.tokenizer import Tokenizer
from model import sample_next

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, sp_model) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.pt", tiny_model(), sp_model)


# ---------------------------------------------------------------- settings


def test_settings_are_checked_and_normalised():
    cfg = sample.check_settings({**sample.DEFAULTS, "top_k": 0, "top_p": 1.0})
    assert cfg["top_k"] is None and cfg["top_p"] is None  # both mean "no limit"
    for bad in ({"top_p": 0.0}, {"top_p": 1.5}, {"temperature": -1.0}, {"top_k": -3}, {"num_samples": 0},
                {"prompt": "a", "prompt_file": "b"}, {"threads": -1}, {"threads": 1.5}):
        with pytest.raises(sample.SampleError):
            sample.check_settings({**sample.DEFAULTS, **bad})


# ---------------------------------------------------------------- streaming and stopping


class ScriptedModel:
    # stands in for a Transformer: generate_stream yields (1,) tensors from a script
    output = torch.nn.Linear(1, 1)  # generate_story puts the prompt on its weight's device

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate_stream(self, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty=1.0):
        self.calls.append(idx.tolist())
        for t in self.script[:max_new_tokens]:
            yield torch.tensor([t])


def story(model, tok, prompt_ids, **cfg):
    pieces = []
    new = generate_story(model, tok, prompt_ids, {**sample.DEFAULTS, **cfg}, pieces.append)
    return new, pieces


def test_stream_stops_at_bos_and_eos(sp_model):
    tok = Tokenizer(sp_model)
    body = tok.encode("The cat sat.", bos=False)
    for stop in (tok.bos_id, tok.eos_id):
        new, pieces = story(ScriptedModel(body + [stop] + body), tok, [tok.bos_id])
        assert new == body and "".join(pieces) == "The cat sat."
    new, _ = story(ScriptedModel(body * 10), tok, [tok.bos_id], max_new_tokens=5)
    assert new == (body * 10)[:5]


def test_streamed_text_equals_full_decode_with_byte_fallback(sp_model):
    tok = Tokenizer(sp_model)
    prompt = tok.encode("Once upon a time")
    continuation = tok.encode(" there was über 🐱 and\na cat.", bos=False)
    assert sum(tok.sp.is_byte(i) for i in continuation) >= 6  # ü and 🐱 are split into bytes
    model = ScriptedModel(continuation)
    new, pieces = story(model, tok, prompt)
    assert model.calls == [[prompt]]  # the prompt is encoded with BOS
    assert "".join(pieces) == tok.decode(prompt + new) == "Once upon a time there was über 🐱 and\na cat."
    assert not any("\ufffd" in p for p in pieces)  # no half characters on the way


def test_real_model_stops_at_end_of_story_token(sp_model, monkeypatch):
    model, tok = tiny_model(), Tokenizer(sp_model)
    prompt = tok.encode("Once upon a time")
    greedy = model.generate(torch.tensor([prompt]), 12, temperature=0.0)[0, len(prompt):].tolist()
    stop = greedy[4]
    monkeypatch.setattr(tok, "eos_id", stop)  # pretend the model's 5th token ends the story
    new, _ = story(model, tok, prompt, temperature=0.0)
    assert new == greedy[: greedy.index(stop)]


# ---------------------------------------------------------------- the command line


def run_main(capsys, *argv):
    code = 0
    try:
        sample.main([*map(str, argv), "--threads=0"])  # 0: leave this process's torch threads alone
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_threads_follow_the_load_unless_set(ckpt, capsys, monkeypatch):
    # train.py's rule: all cores when idle, half beside other jobs, said in the first line; --threads=N as set
    from llamatiny import runtime
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    before = torch.get_num_threads()
    try:
        for load, threads, said in ((0.1, 4, "all cores"), (3.0, 2, "half the cores")):
            monkeypatch.setattr(runtime.os, "getloadavg", lambda load=load: (load, 0.0, 0.0), raising=False)
            sample.main([f"--checkpoint={ckpt}", "--max_new_tokens=2"])
            err = capsys.readouterr().err
            assert torch.get_num_threads() == threads and f"{threads} CPU thread(s) ({said}" in err, err
        sample.main([f"--checkpoint={ckpt}", "--max_new_tokens=2", "--threads=3"])
        assert torch.get_num_threads() == 3 and "3 CPU thread(s)\n" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)

def test_greedy_output_equals_model_generate(ckpt, sp_model, capsys, tmp_path):
    model, tok = tiny_model(), Tokenizer(sp_model)
    prompt = tok.encode("Once upon a time")
    ids = model.generate(torch.tensor([prompt]), 20, temperature=0.0)[0].tolist()
    stops = {tok.bos_id, tok.eos_id}
    end = next((i for i in range(len(prompt), len(ids)) if ids[i] in stops), len(ids))
    expected = tok.decode(ids[:end]) + "\n"
    code, out, err = run_main(capsys, f"--checkpoint={ckpt}", "--prompt=Once upon a time", "--temperature=0",
                              "--max_new_tokens=20")
    assert code == 0 and out == expected and "tokens/s" in err
    # a llama2.c file of the same model, with the tokenizer given, samples the same
    write_llama2c(tmp_path / "model.bin", model, 0)
    code, out, _ = run_main(capsys, f"--checkpoint={tmp_path / 'model.bin'}", f"--tokenizer={sp_model}",
                            "--prompt=Once upon a time", "--temperature=0", "--max_new_tokens=20")
    assert code == 0 and out == expected
    # and so does a prompt file (its trailing newline dropped), nanoGPT's FILE: prompt, and --start, the name
    # llama2.c and nanoGPT give the prompt
    (tmp_path / "prompt.txt").write_text("Once upon a time\n", encoding="utf-8")
    for prompt in (f"--prompt_file={tmp_path / 'prompt.txt'}", f"--prompt=FILE:{tmp_path / 'prompt.txt'}",
                   "--start=Once upon a time", f"--start=FILE:{tmp_path / 'prompt.txt'}"):
        code, out, _ = run_main(capsys, f"--checkpoint={ckpt}", prompt, "--temperature=0",
                                "--max_new_tokens=20")
        assert code == 0 and out == expected, prompt


def repeats(ids: list[int], context: list[int]) -> int:
    # how many of the new ids were already in the context when they came
    return sum(t in context + ids[:i] for i, t in enumerate(ids))


@pytest.mark.parametrize("speedups", [False, True], ids=["plain", "cpu_kernels"])
def test_repetition_penalty_keeps_the_context_s_tokens_out(sp_model, speedups):
    # a penalty this large leaves every token already in the context below any other with a positive logit:
    # greedy, and near-greedy sampling through top-p (the CPU kernels' own sampler), repeat nothing, where
    # the same model without it repeats itself
    model = for_inference(tiny_model(), torch.float32, cpu_speedups=speedups)
    assert (model.sampler is not sample_next) == speedups  # the sampler under test
    prompt = Tokenizer(sp_model).encode("Once upon a time")
    for temperature, top_p in ((0.0, None), (0.05, 0.9)):
        new = {}
        for penalty in (1.0, 1e6):
            torch.manual_seed(0)
            stream = model.generate_stream(torch.tensor([prompt]), 40, temperature, None, top_p,
                                           repetition_penalty=penalty)
            new[penalty] = [int(t) for t in stream]
        assert repeats(new[1.0], prompt) > 0
        assert repeats(new[1e6], prompt) == 0, (temperature, top_p)


def test_repetition_penalty_from_the_command_line(ckpt, sp_model, capsys):
    model, tok = tiny_model(), Tokenizer(sp_model)
    prompt = tok.encode("Once upon a time")
    ids = [int(t) for t in model.generate_stream(torch.tensor([prompt]), 20, 0.0, repetition_penalty=1.5)]
    end = next((i for i, t in enumerate(ids) if t in (tok.bos_id, tok.eos_id)), len(ids))
    code, out, _ = run_main(capsys, f"--checkpoint={ckpt}", "--prompt=Once upon a time", "--temperature=0",
                            "--max_new_tokens=20", "--repetition_penalty=1.5")
    assert code == 0 and out == tok.decode(prompt + ids[:end]) + "\n"
    code, plain, _ = run_main(capsys, f"--checkpoint={ckpt}", "--prompt=Once upon a time", "--temperature=0",
                              "--max_new_tokens=20")
    assert plain != out


def test_a_run_folder_is_its_best_checkpoint_and_the_default_its_latest_run(sp_model, tmp_path, capsys,
                                                                          monkeypatch):
    run = tmp_path / "out" / "15m"
    run.mkdir(parents=True)
    save_checkpoint(run / "ckpt_best.pt", tiny_model(seed=1), sp_model)
    save_checkpoint(run / "ckpt.pt", tiny_model(seed=2), sp_model)
    story = ["--prompt=Once upon a time", "--temperature=0", "--max_new_tokens=20"]
    best, latest = (run_main(capsys, f"--checkpoint={run / name}", *story)[1] for name in ("ckpt_best.pt",
                                                                                           "ckpt.pt"))
    assert best != latest
    code, out, err = run_main(capsys, f"--checkpoint={run}", *story)
    assert code == 0 and out == best
    assert f"note: {run} is a run folder: reading {run / 'ckpt_best.pt'} (its best val loss" in err
    monkeypatch.chdir(tmp_path)  # the default, out/ckpt.pt, is not there; out/ holds one run
    code, out, err = run_main(capsys, *story)
    assert code == 0 and out == best and "note: no out/ckpt.pt; reading out/15m/ckpt_best.pt (its best" in err
    (run / "ckpt_best.pt").unlink()  # a run without a better eval yet: its latest
    code, out, err = run_main(capsys, "--checkpoint=out/15m", *story)
    assert code == 0 and out == latest and "reading out/15m/ckpt.pt (its latest; it has no ckpt_best" in err
    (tmp_path / "out" / "new").mkdir()  # a run that has not saved yet
    (tmp_path / "out" / "new" / "metrics.jsonl").write_text("", encoding="utf-8")
    code, out, err = run_main(capsys, "--checkpoint=out/new", *story)
    assert code == 1 and out == "" and err == "error: out/new is a run folder with no checkpoint yet: " \
        "train.py writes ckpt.pt every checkpoint_interval iterations and at the end\n", err
    # two runs: the default reads the one that saved last, whatever the names' order
    older = tmp_path / "out" / "42m"
    older.mkdir()
    save_checkpoint(older / "ckpt.pt", tiny_model(seed=1), sp_model)
    for when, newest, expected in ((2e9, run, latest), (3e9, older, best)):
        os.utime(newest / "ckpt.pt", (when, when))
        code, out, err = run_main(capsys, *story)
        assert code == 0 and out == expected
        assert f"reading out/{newest.name}/ckpt.pt (its latest; it has no ckpt_best.pt), of the most " \
               "recent run in out/; 1 older run(s) there" in err, err


def test_hugging_face_directory_loads_and_samples(sp_model, capsys, tmp_path):
    # export.py --format=hf's directory is a checkpoint too: same weights, its own tokenizer.model
    model = tiny_model()
    write_hf(tmp_path / "hf", model, sp_model)
    loaded, checkpoint = from_checkpoint(tmp_path / "hf")
    assert dataclasses.replace(loaded.args, multiple_of=1) == dataclasses.replace(model.args, multiple_of=1)
    assert checkpoint["tokenizer"] == str((tmp_path / "hf" / "tokenizer.model").resolve())
    tokens = torch.randint(0, 400, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens, tokens)[0], model(tokens, tokens)[0])
    code, out, err = run_main(capsys, f"--checkpoint={tmp_path / 'hf'}", "--prompt=Once upon a time",
                              "--temperature=0", "--max_new_tokens=20")
    assert code == 0 and "tokens/s" in err and "hf/tokenizer.model" in err
    save_checkpoint(tmp_path / "ckpt.pt", model, sp_model)
    code, expected, _ = run_main(capsys, f"--checkpoint={tmp_path / 'ckpt.pt'}", "--prompt=Once upon a time",
                                 "--temperature=0", "--max_new_tokens=20")
    assert code == 0 and out == expected


def test_help_lists_every_option_with_its_default(capsys):
    for flag in ("--help", "-h"):
        code, out, err = run_main(capsys, flag)
        assert code == 0 and err == "" and out.startswith("usage: python sample.py")
        assert '--instruction="Words: dog\\nFeatures: Dialogue"' in out  # the \n to type, not a line break
        # every option shown, typed back as shown, is accepted and means its default
        shown = re.findall(r"^  (--\w+=\S+)", out, flags=re.M)
        assert len(shown) == len(sample.DEFAULTS)
        for option in shown:
            assert sample.check_settings(parse_config(sample.DEFAULTS, [option])) == \
                sample.check_settings(dict(sample.DEFAULTS)), option


def test_samples_are_separated(ckpt, capsys):
    code, out, _ = run_main(capsys, f"--checkpoint={ckpt}", "--num_samples=3", "--max_new_tokens=8",
                            "--seed=3")
    assert code == 0 and out.count("\n" + sample.SEPARATOR + "\n") == 2


def run_script(*argv, cwd):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, argv)], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


@pytest.mark.slow
def test_same_seed_same_stories_in_separate_processes(ckpt, tmp_path):
    args = [f"--checkpoint={ckpt}", "--num_samples=2", "--max_new_tokens=30", "--temperature=1.0",
            "--top_k=50"]
    first, second = run_script(*args, "--seed=7", cwd=tmp_path), run_script(*args, "--seed=7", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and len(first.stdout) > 40
    other = run_script(*args, "--seed=8", cwd=tmp_path)
    assert other.stdout != first.stdout


def test_llama2_vocabulary(llama2_tokenizer, tmp_path, capsys):
    model = tiny_model(vocab_size=32000, dim=32, n_heads=2, n_kv_heads=1, n_layers=1)
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", model, llama2_tokenizer)
    code, out, err = run_main(capsys, f"--checkpoint={ckpt}", "--prompt=Once upon a time",
                              "--max_new_tokens=10")
    assert code == 0 and out.startswith("Once upon a time"), err
    assert len(out[len("Once upon a time"):].strip()) >= 5, out  # new text, not only the echoed prompt


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, sp_model):
    d = tmp_path_factory.mktemp("bad")
    model = tiny_model()
    write_llama2c(d / "model.bin", model, 0)
    return {
        "ckpt": save_checkpoint(d / "ckpt.pt", model, sp_model),
        "lost_tokenizer": save_checkpoint(d / "lost.pt", model, d / "moved" / "tok.model"),
        "big_vocab": save_checkpoint(d / "big.pt", tiny_model(vocab_size=512), sp_model),
        "bin": d / "model.bin",
        "dir": d,
        "not_utf8": write_bytes(d / "latin1.txt", "Once upon a time, café".encode("latin-1")),
        "damaged_hf": damaged_hf(d / "damaged_hf", model),
        "empty_dir": write_bytes(d / "empty" / "notes.txt", b"").parent,
    }


def damaged_hf(d: Path, model) -> Path:
    write_hf(d, model)
    (d / "model.safetensors").write_bytes(b"not safetensors")
    return d


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint=nowhere/ckpt.pt"], "error: no checkpoint at nowhere/ckpt.pt"),
    (["--checkpoint={lost_tokenizer}"],
     "error: tokenizer not found: {dir}/moved/tok.model (the path recorded"),
    (["--checkpoint={ckpt}", "--tokenizer=nowhere.model"], "error: tokenizer not found: nowhere.model"),
    (["--checkpoint={big_vocab}"], "has 400 tokens but the model's vocab_size is 512"),
    (["--checkpoint={bin}"], "records no tokenizer (a llama2.c file?): pass --tokenizer="),
    (["--checkpoint={ckpt}", "--prompt=" + "Once upon a time " * 30], "but the model's context is 64"),
    (["--checkpoint={ckpt}", "--prompt", "Once upon a time"], "unexpected argument 'Once upon a time'"),
    (["--checkpoint={ckpt}", "--prompt_file=nowhere.txt"], "prompt file not found: nowhere.txt"),
    (["--checkpoint={ckpt}", "--top_p=2"], "--top_p=2.0 must be in (0, 1]"),
    (["--checkpoint={ckpt}", "--repetition_penalty=0"], "--repetition_penalty=0.0 must be positive"),
    (["--checkpoint={ckpt}", "--prompt=a", "--start=b"], "give one of --prompt and --start, not both"),
    (["--checkpoint={ckpt}", "--start=FILE:nowhere.txt"], "prompt file not found: nowhere.txt"),
    (["--checkpoint={ckpt}", "--temprature=0"], "did you mean 'temperature'"),
    (["--checkpoint={ckpt}", "--dtype=float8"], "--dtype=float8"),
    (["--checkpoint={dir}/model.bin", "--tokenizer={dir}/model.bin"], "looks like llama2.c's tokenizer.bin"),
    (["--checkpoint={ckpt}", "--prompt_file={not_utf8}"], "is not UTF-8 text"),
    (["--checkpoint={ckpt}", "--device=gpu"],
     "--device=gpu is not a device: use auto, cpu, cuda, cuda:N or mps"),
    (["--checkpoint={empty_dir}"], "config.json not found"),
    (["--checkpoint={damaged_hf}"], "is not a Hugging Face Llama directory (SafetensorError"),
])
def test_bad_input_is_one_line_error(bad_inputs, capsys, argv, message, monkeypatch):
    monkeypatch.chdir(bad_inputs["dir"])
    code, out, err = run_main(capsys, *(a.format(**bad_inputs) for a in argv))
    assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    assert message.format(**bad_inputs) in err


def test_bad_checkpoint_file_is_one_line_error(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code, _, err = run_main(capsys, f"--checkpoint={tmp_path / 'junk.pt'}")
    assert code == 1 and err.startswith(f"error: cannot load checkpoint {tmp_path / 'junk.pt'}: ")
    assert err.count("\n") == 1


def test_error_in_a_real_process_has_no_traceback(bad_inputs, tmp_path):
    result = run_script(f"--checkpoint={bad_inputs['big_vocab']}", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "vocab_size is 512" in result.stderr


def test_reader_closing_the_pipe_stops_quietly(ckpt, tmp_path):
    # `python sample.py | head -c 20`: no BrokenPipeError traceback when the reader goes away
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), f"--checkpoint={ckpt}",
                             "--num_samples=1000", "--max_new_tokens=60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.read(20)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and b"Traceback" not in err, err.decode()
