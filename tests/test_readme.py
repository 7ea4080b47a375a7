"""README.md's command lines, pasted in order as a newcomer would, in a copy of the scripts: a line that
breaks fails here. The lines run as written, with LLAMA_TINY_SMOKE_TEST=1 (llamatiny/settings.py), which
every train.py run honours: a tiny model and a thousandth of each count of iterations, so that a resume or a
fine-tune meets its run as a user's does. Lines marked "(GPU)" or "(llama.cpp)" (its programs are not
installed here) and `pip install` are left out, and so is running the test suite. Offline: `download` gets
`--url` a local folder with the synthetic corpus as TinyStories (V1 and V2) and a 512-token tokenizer standing
in for Llama 2's, and llama2.c's published stories15M.bin is a small model made here.

Most of a command's time at this size is Python importing torch: the lines run in children forked from one
process that imported it once (conftest.ForkServer)."""
import glob
import random
import re
import shlex
import shutil
import subprocess

import pytest
from conftest import ROOT, ForkServer

import tinystories
from llamatiny.checkpoint import write_llama2c
from llamatiny.corpus import make_stories, write_endoftext, write_tinystories_archive
from llamatiny.settings import SMOKE_TEST
from model import ModelArgs, Transformer

pytestmark = pytest.mark.slow

def readme_commands() -> list[str]:
    """The lines of README.md's ```bash blocks that a CPU user pastes, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.strip()
            if not line or line.startswith("#") or "(GPU)" in line or "(llama.cpp)" in line:
                continue
            line = re.sub(r"^pip install [^&]*&&\s*", "", line)  # the quick start's install, done already
            if not line.startswith("pip ") and "pytest" not in line:  # (the suite itself runs this test)
                lines.append(line)
    return lines


@pytest.fixture
def workdir(tmp_path):
    # a copy of the scripts, so that data/ and out/ land outside the checkout
    work = tmp_path / "work"
    work.mkdir()
    for path in ROOT.glob("*.py"):
        shutil.copy(path, work)
    shutil.copytree(ROOT / "config", work / "config")
    shutil.copytree(ROOT / "llamatiny", work / "llamatiny", ignore=shutil.ignore_patterns("__pycache__"))
    # the "internet": TinyStories and the Llama 2 tokenizer in a folder that --url FOLDER/ reads
    mirror = tmp_path / "mirror"
    stories = make_stories(2000, seed=5)
    mirror.mkdir()
    write_tinystories_archive(mirror / "TinyStories_all_data.tar.gz", stories)
    write_endoftext(tmp_path / "stand_in.txt", stories)
    write_endoftext(mirror / "TinyStoriesV2-GPT4-train.txt", stories[200:])  # --version 2's two files
    write_endoftext(mirror / "TinyStoriesV2-GPT4-valid.txt", stories[:200])
    model = tinystories.train_vocab(tmp_path, 512, input=tmp_path / "stand_in.txt", name="llama2")
    shutil.copy(model, mirror / "tokenizer.model")
    # files a user brings: their own text (varied enough for the README's 4096-token vocabulary), and
    # llama2.c's stories15M.bin (here a small model in the stand-in's vocabulary)
    rng = random.Random(6)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(6000)]
    write_endoftext(work / "my.txt", make_stories(1500, seed=6)
                    + [" ".join(rng.sample(words, 60)) + "." for _ in range(300)])
    small = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=512, multiple_of=16,
                                  max_seq_len=32))
    write_llama2c(work / "stories15M.bin", small)
    return work, mirror


@pytest.fixture
def fork_server(workdir, tmp_path):
    work, _ = workdir
    with ForkServer(work, tmp_path / "logs", {SMOKE_TEST: "1"}) as server:
        yield server


def test_the_readme_runs_as_pasted(workdir, fork_server):
    work, mirror = workdir
    commands = readme_commands()
    assert len(commands) > 25 and any(c.startswith("python train.py") for c in commands)
    for line in commands:
        words = shlex.split(line, comments=True)
        if words[0] != "python":  # a shell line (echo ... > prompt.txt)
            result = subprocess.run(line, shell=True, cwd=work, capture_output=True, text=True, timeout=60)
        else:
            if words[1:3] == ["tinystories.py", "download"]:
                words += ["--url", f"{mirror}/"]  # the "internet"
            argv = [m for w in words[1:] for m in (sorted(glob.glob(w, root_dir=work)) or [w])]  # out/*
            result = fork_server.run(argv, cwd=work)
        out, err = result.stdout, result.stderr
        assert result.returncode == 0, f"README line failed: {line}\n{out[-1500:]}{err[-1500:]}"
        assert "Traceback" not in err, f"{line}\n{err[-1500:]}"
        if words[1] == "train.py":
            assert f"{SMOKE_TEST}: a smoke test's" in out, out[-1500:]
    assert (work / "out" / "15m" / "ckpt.pt").is_file() and (work / "runs.png").is_file()
    assert (work / "out" / "model.tokenizer.bin").is_file() and (work / "out" / "adapter").is_dir()
