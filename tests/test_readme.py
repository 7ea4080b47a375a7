"""README.md's command lines, pasted in order as a newcomer would, in a copy of the scripts: a line that
breaks fails here. The lines run as written, with LLAMA_TINY_SMOKE_TEST=1 (llamatiny/settings.py), which
every train.py run honours: a tiny model and a thousandth of each count of iterations, so that a resume or a
fine-tune meets its run as a user's does. Lines marked "(GPU)" or "(llama.cpp)" (its programs are not
installed here) and `pip install` are left out, and so is running the test suite. Offline: `download` gets
`--url` a local folder with the synthetic corpus as TinyStories (V1 and V2) and a 512-token tokenizer standing
in for Llama 2's, and llama2.c's published stories15M.bin is a small model made here.

Most of a command's time at this size is Python importing torch: one server process imports it once and
forks a child per command, which runs the script as `python script.py ...` would (runpy, its own argv, its
output to files, its exit code)."""
import glob
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

import tinystories
from llamatiny.checkpoint import write_llama2c
from llamatiny.corpus import make_stories, write_endoftext, write_tinystories_archive
from llamatiny.settings import SMOKE_TEST
from model import ModelArgs, Transformer

pytestmark = pytest.mark.slow

# reads [argv, stdout file, stderr file] lines; runs each in a forked child; answers its exit code
FORK_SERVER = """
import importlib, json, os, runpy, signal, sys, traceback
# what the commands import, once (torch._dynamo: train.py's first model on the meta device loads it)
for name in ("torch", "torch._dynamo", "model", "train", "sample", "eval", "export", "tinystories", "plot"):
    importlib.import_module(name)
for request in sys.stdin:
    argv, out, err = json.loads(request)
    pid = os.fork()
    if pid == 0:
        signal.alarm(300)  # a command that hangs dies
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY | os.O_CREAT),
                                (2, err, os.O_WRONLY | os.O_CREAT)):
            os.dup2(os.open(path, flags), fd)
        sys.argv, code = argv, 0
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:  # as the interpreter does: None is 0, a message is printed and is 1
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


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
def fork_server(workdir):
    work, _ = workdir
    env = dict(os.environ, **{SMOKE_TEST: "1"})
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], cwd=work, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(argv: list[str], log) -> tuple[int, str, str]:
        server.stdin.write(json.dumps([argv, f"{log}.out", f"{log}.err"]) + "\n")
        server.stdin.flush()
        code = int(server.stdout.readline())
        return code, *(open(f"{log}.{kind}", encoding="utf-8").read() for kind in ("out", "err"))

    yield run
    server.stdin.close()
    server.wait(timeout=60)


def test_the_readme_runs_as_pasted(workdir, fork_server, tmp_path):
    work, mirror = workdir
    commands = readme_commands()
    assert len(commands) > 25 and any(c.startswith("python train.py") for c in commands)
    for i, line in enumerate(commands):
        words = shlex.split(line, comments=True)
        if words[0] != "python":  # a shell line (echo ... > prompt.txt)
            result = subprocess.run(line, shell=True, cwd=work, capture_output=True, text=True, timeout=60)
            code, out, err = result.returncode, result.stdout, result.stderr
        else:
            if words[1:3] == ["tinystories.py", "download"]:
                words += ["--url", f"{mirror}/"]  # the "internet"
            argv = [m for w in words[1:] for m in (sorted(glob.glob(w, root_dir=work)) or [w])]  # out/*
            code, out, err = fork_server(argv, tmp_path / f"command{i}")
        assert code == 0, f"README line failed: {line}\n{out[-1500:]}{err[-1500:]}"
        assert "Traceback" not in err, f"{line}\n{err[-1500:]}"
        if words[1] == "train.py":
            assert f"{SMOKE_TEST}: a smoke test's" in out, out[-1500:]
    assert (work / "out" / "15m" / "ckpt.pt").is_file() and (work / "runs.png").is_file()
    assert (work / "out" / "model.tokenizer.bin").is_file() and (work / "out" / "adapter").is_dir()
