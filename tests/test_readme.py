"""README.md's command lines, pasted in order as a newcomer would, in a copy of the scripts: a line that
breaks fails here. Only sizes shrink, by settings the test appends to each line (a smaller model and
fewer iterations for train.py, only fewer iterations for a resumed run, which takes the rest from its
checkpoint as a user's does; fewer tokens for sample.py); lines marked "(GPU)" or "(llama.cpp)" (its
programs are not installed here) and `pip install` are left out, and so is running the test suite.
Offline: `download` gets a local folder with the synthetic corpus as TinyStories (V1 and V2) and a
512-token tokenizer standing in for Llama 2's (so every "Llama 2" run here has vocab_size=512), and
llama2.c's published stories15M.bin is a small model made here."""
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
from model import ModelArgs, Transformer

pytestmark = pytest.mark.slow

SMALL_MODEL = ["--dim=32", "--n_layers=1", "--n_heads=2", "--n_kv_heads=1", "--multiple_of=16",
               "--max_seq_len=32", "--vocab_size=512", "--batch_size=4", "--gradient_accumulation_steps=1",
               "--eval_iters=1", "--warmup_iters=1", "--eval_interval=2", "--compile=False", "--device=cpu"]


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


def shrunk(line: str, iters: int) -> str:
    # the sizes the test appends: later settings win, for argparse and train.py's --key=value alike
    words = shlex.split(line.split("  #")[0])
    script = words[1] if words[0] == "python" else None
    extra = []
    if script == "train.py":
        extra = ([] if "--init_from=resume" in words else SMALL_MODEL) + [f"--max_iters={iters}"]
    elif script == "demo.py":
        extra = ["--max_iters=20", "--eval_interval=10", "--warmup_iters=5"]
    elif script in ("sample.py", "eval.py"):
        extra = ["--max_new_tokens=16"]
    elif script == "tinystories.py" and "--vocab_size" in words and "0" not in words:
        extra = ["--vocab_size", "512"]  # own vocabularies of a corpus this small
    return shlex.join(words + extra) if extra else line.split("  #")[0]


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
    # files a user brings: their own text, and llama2.c's stories15M.bin (here a small model, same vocabulary)
    write_endoftext(work / "my.txt", make_stories(1500, seed=6))
    small = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=512, multiple_of=16,
                                  max_seq_len=32))
    write_llama2c(work / "stories15M.bin", small)
    return work, mirror


def test_the_readme_runs_as_pasted(workdir):
    work, mirror = workdir
    commands = readme_commands()
    assert len(commands) > 25 and any(c.startswith("python train.py") for c in commands)
    iters = 2
    for line in commands:
        if "train.py" in line:
            iters += 2  # each run a little longer than the one before, so that resumed runs train too
        command = shrunk(line, iters)
        if command.startswith("python tinystories.py download"):
            command += f" --url {mirror}/"
        command = re.sub(r"^python ", shlex.quote(sys.executable) + " ", command)
        result = subprocess.run(command, shell=True, cwd=work, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (f"README line failed: {line}\n"
                                        f"{result.stdout[-1500:]}{result.stderr[-1500:]}")
        assert "Traceback" not in result.stderr, f"{line}\n{result.stderr[-1500:]}"
    assert (work / "out" / "15m" / "ckpt.pt").is_file() and (work / "runs.png").is_file()
    assert (work / "out" / "model.tokenizer.bin").is_file() and (work / "out" / "adapter").is_dir()
