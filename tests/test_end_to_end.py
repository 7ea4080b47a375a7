"""The whole pipeline as a user runs it: real command lines, each in a process of its own (forked from one
that imported torch once: conftest.ForkServer), no imports of the scripts.

download (from a local `python -m http.server`) -> train_vocab -> pretokenize -> train -> resume
-> sample -> export (llama2.c and Hugging Face) -> sample from the exported llama2.c file.
"""
import json
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ForkServer

from llamatiny.corpus import make_stories, write_json_shards

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture
def python(tmp_path):
    # `python SCRIPT ARGS` in cwd: what it printed, once it has succeeded without a traceback
    with ForkServer(ROOT, tmp_path / "logs") as server:
        def run(script, *args, cwd) -> str:
            result = server.run([script, *args], cwd)
            assert result.returncode == 0, f"{args} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            assert "Traceback" not in result.stderr
            return result.stdout + result.stderr
        yield run


def run(*args, cwd) -> str:
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr
    return result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_server(tmp_path):
    """Serves tmp_path/www with the standard library's own file server, as a user might."""
    www = tmp_path / "www"
    www.mkdir()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(www)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):  # wait until it answers
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    yield www, url
    server.terminate()
    server.wait()


def test_download_to_export(tmp_path, http_server, python):
    www, url = http_server
    json_dir = tmp_path / "archive"
    write_json_shards(str(json_dir), make_stories(1600, seed=3), 4)  # data00 validation, data01-03 train
    with tarfile.open(www / "TinyStories_all_data.tar.gz", "w:gz") as tar:
        for shard in sorted(json_dir.iterdir()):
            tar.add(shard, arcname=shard.name)
    work, data = tmp_path / "work", "data"
    work.mkdir()

    # download: the archive arrives and unpacks; the missing tokenizer is a note, not a failure
    out = python("tinystories.py", "download", "--url", f"{url}/TinyStories_all_data.tar.gz",
              "--tokenizer_url", f"{url}/no_such_tokenizer.model", cwd=work)
    assert sorted(p.name for p in (work / data / "TinyStories_all_data").glob("*.json")) == \
        [f"data0{i}.json" for i in range(4)]
    assert "note: skipped the Llama 2 tokenizer" in out
    assert not list((work / data).rglob("*.part"))
    assert "already" in python("tinystories.py", "download",
                            "--url", f"{url}/TinyStories_all_data.tar.gz",
                            "--tokenizer_url", f"{url}/no_such_tokenizer.model", cwd=work)

    # a vocabulary of our own, then shards: data00.bin validation, the rest train
    python("tinystories.py", "train_vocab", "--vocab_size", "320", cwd=work)
    assert (work / data / "tok320.model").is_file()
    python("tinystories.py", "pretokenize", "--vocab_size", "320", cwd=work)
    shards = sorted(p.name for p in (work / data / "tok320").glob("data*.bin"))
    assert shards == [f"data0{i}.bin" for i in range(4)]
    assert json.loads((work / data / "tok320" / "meta.json").read_text(encoding="utf-8"))["vocab_size"] == 320

    # train a hundred iterations, then resume to two hundred: enough for words, not only spaces
    model = ["--vocab_source=custom", "--vocab_size=320", "--dim=48", "--n_layers=2", "--n_heads=4",
             "--max_seq_len=64", "--batch_size=8", "--gradient_accumulation_steps=1", "--learning_rate=3e-3",
             "--warmup_iters=5", "--eval_interval=50", "--eval_iters=4", "--log_interval=10",
             "--device=cpu", "--compile=False", "--out_dir=out", "--checkpoint_interval=50"]
    python("train.py", *model, "--max_iters=100", cwd=work)
    ckpt = work / "out" / "ckpt.pt"
    assert ckpt.is_file() and (work / "out" / "config.json").is_file()
    python("train.py", *model, "--max_iters=200", "--lr_decay_iters=200", "--init_from=resume", cwd=work)
    lines = (work / "out" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    metrics = [json.loads(line) for line in lines]
    train_losses = [m["loss"] for m in metrics if "loss" in m]
    assert max(m["iter"] for m in metrics) == 200
    assert train_losses[-1] < train_losses[0] - 1.0  # from ~ln(320) = 5.8 towards the corpus' entropy
    val_losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert val_losses[-1] < val_losses[0]

    # sample greedily: a story that continues the prompt
    greedy = ["--prompt=Once upon a time", "--temperature=0", "--max_new_tokens=40", "--num_samples=1"]
    story = python("sample.py", f"--checkpoint={ckpt}", *greedy, cwd=work)
    assert len(generated_after("Once upon a time", story)[0].split()) >= 5, story  # new words, not the echo
    assert "tokens/s" in story

    # export to run.c's format and to Hugging Face; the exported .bin samples the same story
    python("export.py", "model.bin", f"--checkpoint={ckpt}", "--format=llama2c", "--version=1", cwd=work)
    assert (work / "model.bin").is_file() and (work / "model.tokenizer.bin").is_file()
    python("export.py", "hf", f"--checkpoint={ckpt}", "--format=hf", cwd=work)
    exported = {p.name for p in (work / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= exported
    from_bin = python("sample.py", "--checkpoint=model.bin",
                   f"--tokenizer={work / data / 'tok320.model'}", *greedy, cwd=work)
    assert story_text(from_bin) == story_text(story)


def story_text(output: str) -> str:
    # the generated text, without the header and speed lines that differ between the two runs
    return "\n".join(line for line in output.splitlines() if "Once upon a time" in line)


def generated_after(prompt: str, output: str) -> list[str]:
    # the text each story adds after the echoed prompt
    return [line.split(prompt, 1)[1].strip() for line in output.splitlines() if prompt in line]


def test_demo_runs_offline_outside_the_checkout(tmp_path):
    # the README's first command, shortened: same steps, fewer iterations, its data and run in tmp_path
    before = sorted(p.relative_to(ROOT) for p in ROOT.rglob("*") if ".git" not in p.parts
                    and "__pycache__" not in p.parts and ".pytest_cache" not in p.parts)
    out = run(ROOT / "demo.py", "--max_iters=30", "--eval_interval=30", "--warmup_iters=5",
              f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'demo_out'}", cwd=tmp_path)
    assert (tmp_path / "demo_out" / "ckpt.pt").is_file()
    assert (tmp_path / "data" / "fixture" / "meta.json").is_file()
    stories = generated_after("Once upon a time", out.split("$ python sample.py", 1)[1].split("\n", 1)[1])
    assert len(stories) == 2 and all(len(s.split()) >= 5 for s in stories), stories
    after = sorted(p.relative_to(ROOT) for p in ROOT.rglob("*") if ".git" not in p.parts
                   and "__pycache__" not in p.parts and ".pytest_cache" not in p.parts)
    assert after == before  # nothing written into the checkout
