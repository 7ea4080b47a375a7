import contextlib
import io
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


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
