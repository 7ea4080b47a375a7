import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the scripts at the root are imported as modules by the tests
sys.path.insert(0, str(ROOT / "tests"))

# ../shared beside the checkout (real TinyStories sample + the Llama 2 tokenizer); absent on a user's clone
SHARED = Path(os.environ.get("LLAMA_SHARED_DIR", ROOT.parent / "shared"))
SHARED_STORIES = SHARED / "data" / "tinystories"
LLAMA2_TOKENIZER = SHARED / "tokenizers" / "llama2.model"


def run_main(main, argv: list[str]) -> subprocess.CompletedProcess:
    """A command's main(argv) run in this process as its own process would run it: the exit code and what it
    printed, without a second of torch's start-up. torch's thread count is put back afterwards."""
    import torch

    out, err, code, threads = io.StringIO(), io.StringIO(), 0, torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(argv)
    except SystemExit as e:  # as the interpreter does: None is 0, a message is printed and is 1
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    finally:
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


# reads [argv, cwd, stdout file, stderr file] lines; runs each in a forked child; answers its exit code
FORK_SERVER = """
import importlib, json, os, runpy, signal, sys, traceback
sys.path[0] = os.getcwd()  # the scripts' folder, whatever folder a command runs in
# what the commands import, once (torch._dynamo: train.py's first model on the meta device loads it)
for name in ("torch", "torch._dynamo", "model", "train", "sample", "eval", "export", "tinystories", "plot"):
    importlib.import_module(name)
for request in sys.stdin:
    argv, cwd, out, err = json.loads(request)
    pid = os.fork()
    if pid == 0:
        signal.alarm(300)  # a command that hangs dies
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY | os.O_CREAT),
                                (2, err, os.O_WRONLY | os.O_CREAT)):
            os.dup2(os.open(path, flags), fd)
        os.chdir(cwd)
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


class ForkServer:
    """Runs `python SCRIPT ARGS` as a new process would, the scripts in `scripts`, from one process that
    imported torch and them once: each command is a child forked from it (its own argv, cwd, exit code and
    output), seconds faster than a process that starts Python and torch afresh."""

    def __init__(self, scripts: Path, logs: Path, env: dict | None = None):
        logs.mkdir(parents=True, exist_ok=True)
        self.scripts, self.logs, self.count = Path(scripts), logs, 0
        self.server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], cwd=scripts, text=True,
                                       env=dict(os.environ, **(env or {})), stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE)

    def run(self, argv: list, cwd: Path) -> subprocess.CompletedProcess:
        self.count += 1
        out, err = (self.logs / f"{self.count}.{kind}" for kind in ("out", "err"))
        argv = [str(self.scripts / argv[0]), *map(str, argv[1:])]
        self.server.stdin.write(json.dumps([argv, str(cwd), str(out), str(err)]) + "\n")
        self.server.stdin.flush()
        code = int(self.server.stdout.readline())
        return subprocess.CompletedProcess(argv, code, out.read_text(encoding="utf-8"),
                                           err.read_text(encoding="utf-8"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.stdin.close()
        self.server.wait(timeout=60)


@pytest.fixture
def shared_stories() -> Path:
    if not (SHARED_STORIES / "TinyStories_all_data_sample.tar.gz").exists():
        pytest.skip(f"real TinyStories sample not found at {SHARED_STORIES} (set LLAMA_SHARED_DIR)")
    return SHARED_STORIES


@pytest.fixture
def llama2_tokenizer() -> Path:
    if not LLAMA2_TOKENIZER.exists():
        pytest.skip(f"Llama 2 tokenizer not found at {LLAMA2_TOKENIZER} (set LLAMA_SHARED_DIR)")
    return LLAMA2_TOKENIZER


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    # the synthetic story corpus with its own 512-token vocabulary, made by the data stage's own functions
    import tinystories
    from llamatiny.corpus import make_stories, write_endoftext

    root = tmp_path_factory.mktemp("train_data")
    text = root / "stories.txt"
    write_endoftext(text, make_stories(1500, seed=3))
    tinystories.train_vocab(root, 512, input=text, name="fixture")
    tinystories.prepare(root, text, "fixture", vocab_size=512)
    return root


def pytest_configure(config):
    # tests in parallel (pytest-xdist): each worker takes its share of the cores, so that none waits for
    # threads the others hold
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // workers))


def pytest_collection_modifyitems(config, items):
    import torch

    # the slow tests first, so that in parallel the longest ones start at once instead of ending the run alone
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
