"""train_vocab, pretokenize, prepare and the tokenizer, on the fixture corpus (and the real TinyStories
sample where present). No network."""
import json
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import sentencepiece as spm
from conftest import ROOT

import tinystories as ts
from llamatiny import download
from llamatiny.corpus import make_stories, write_endoftext, write_json_shards
from llamatiny.data import TINYSTORIES_DIR, BatchLoader, DataError, dataset_dir, list_shards, read_meta
from llamatiny.readers import chunk_text
from llamatiny.tokenizer import Tokenizer

VOCAB = 512


def decode_docs(shard, tok: Tokenizer) -> list[str]:
    """A shard back to its documents, split at BOS."""
    ids = np.fromfile(shard, dtype=np.uint16).tolist()
    starts = [i for i, t in enumerate(ids) if t == tok.bos_id] + [len(ids)]
    assert not ids or starts[0] == 0, "a shard starts with BOS"
    return [tok.decode(ids[a + 1:b]) for a, b in zip(starts, starts[1:])]


def write_tinystories(data_dir, stories, shards):
    write_json_shards(str(data_dir / TINYSTORIES_DIR), stories, shards)


@pytest.fixture(scope="module")
def corpus():
    # stories with the awkward bits real data has: surrounding whitespace, newlines, non-ASCII, digits
    stories = make_stories(600, seed=3)
    stories[5] = "  Lily saw 12 ducks.\nShe said:  \u201chello, caf\u00e9!\u201d \U0001F642  "
    stories[7] = "\n\n   \n"  # empty once stripped: skipped
    return stories


@pytest.fixture(scope="module")
def tok512(tmp_path_factory, corpus):
    """data dir with 3 TinyStories-style shards, a 512-token vocabulary and its shards (built once)."""
    data = tmp_path_factory.mktemp("data")
    write_tinystories(data, corpus, 3)
    assert ts.main(["train_vocab", "--vocab_size", str(VOCAB), "--data_dir", str(data)]) == 0
    assert ts.main(["pretokenize", "--vocab_size", str(VOCAB), "--data_dir", str(data)]) == 0
    return data


def expected_shards(stories, shards):
    per = -(-len(stories) // shards)
    return [[s.strip() for s in stories[i * per:(i + 1) * per] if s.strip()] for i in range(shards)]


# -----------------------------------------------------------------------------
# train_vocab and pretokenize

def test_shards_decode_to_exactly_the_stories(tok512, corpus):
    tok = Tokenizer(tok512 / f"tok{VOCAB}.model")
    shards = list_shards(tok512 / f"tok{VOCAB}")
    assert [p.name for p in shards] == ["data00.bin", "data01.bin", "data02.bin"]
    assert [decode_docs(p, tok) for p in shards] == expected_shards(corpus, 3)


def test_bos_count_equals_story_count_and_meta(tok512, corpus):
    out = tok512 / f"tok{VOCAB}"
    tok = Tokenizer(tok512 / f"tok{VOCAB}.model")
    ids = np.concatenate([np.fromfile(p, dtype=np.uint16) for p in list_shards(out)])
    n_stories = sum(1 for s in corpus if s.strip())
    assert (ids == tok.bos_id).sum() == n_stories
    meta = read_meta(out)
    assert meta["tokenizer"] == str((tok512 / f"tok{VOCAB}.model").resolve())
    assert (meta["vocab_size"], meta["bos_id"], meta["eos_id"]) == (VOCAB, tok.bos_id, tok.eos_id)
    assert (meta["num_stories"], meta["num_tokens"]) == (n_stories, len(ids))
    assert not list(out.glob("*.tmp"))


def test_train_vocab_is_deterministic_with_llama2c_choices(tok512, tmp_path, corpus):
    write_tinystories(tmp_path, corpus, 3)
    ts.train_vocab(tmp_path, VOCAB)
    assert (tmp_path / f"tok{VOCAB}.model").read_bytes() == (tok512 / f"tok{VOCAB}.model").read_bytes()
    tok = Tokenizer(tmp_path / f"tok{VOCAB}.model")
    assert tok.vocab_size == VOCAB
    assert tok.sp.piece_to_id("<0x0A>") != tok.sp.unk_id()  # byte fallback: newlines and emoji survive
    text = corpus[5].strip()
    assert tok.decode(tok.encode(text)) == text
    assert all(len(tok.decode([i]).strip()) <= 1 for i in tok.encode("a 2024", bos=False))  # split digits


def test_train_vocab_only_samples_training_stories(tmp_path):
    # the sample comes from data01... (data00 is validation): a word only in data00 is not a piece
    stories = make_stories(300, seed=1)
    stories[:150] = [s.replace("Once", "Zyxwvut") for s in stories[:150]]
    write_tinystories(tmp_path, stories, 2)
    ts.train_vocab(tmp_path, 300, num_stories=100)
    tok = Tokenizer(tmp_path / "tok300.model")
    assert tok.sp.piece_to_id("\u2581Zyxwvut") == tok.sp.unk_id()


def test_llama2_vocab_gives_sentencepiece_ids(tmp_path, corpus, llama2_tokenizer):
    write_tinystories(tmp_path, corpus[:200], 2)
    shutil.copy(llama2_tokenizer, tmp_path / download.LLAMA2_TOKENIZER)
    assert ts.main(["pretokenize", "--vocab_size", "0", "--data_dir", str(tmp_path)]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer))
    out = tmp_path / TINYSTORIES_DIR
    for shard, stories in zip(list_shards(out), expected_shards(corpus[:200], 2)):
        expected = [i for s in stories for i in [sp.bos_id()] + sp.encode(s)]
        assert np.fromfile(shard, dtype=np.uint16).tolist() == expected
    assert read_meta(out)["vocab_size"] == 32000


def test_real_stories_round_trip(tmp_path, shared_stories, llama2_tokenizer):
    src = tmp_path / TINYSTORIES_DIR
    with tarfile.open(shared_stories / "TinyStories_all_data_sample.tar.gz") as tar:
        tar.extractall(src, filter="data")
    stories = [[d["story"].strip() for d in json.loads(p.read_text(encoding="utf-8"))]
               for p in list_shards(src, "json")]
    ts.pretokenize(tmp_path, 0, tokenizer=llama2_tokenizer)
    tok = Tokenizer(llama2_tokenizer)
    decoded = [decode_docs(p, tok) for p in list_shards(src)]
    assert decoded == [[s for s in shard if s] for shard in stories]
    assert read_meta(src)["num_stories"] == 500 + 3642
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer))  # the ids themselves, on real text
    ids = sp.encode([s for shard in stories for s in shard if s], add_bos=True)
    shards = [np.fromfile(p, np.uint16) for p in list_shards(src)]
    assert np.concatenate(shards).tolist() == [i for s in ids for i in s]
    # a vocabulary of our own reproduces the real text exactly too (runs of spaces, mojibake, \n\n)
    ts.train_vocab(tmp_path, VOCAB, num_stories=1000)
    ts.pretokenize(tmp_path, VOCAB)
    tok = Tokenizer(tmp_path / f"tok{VOCAB}.model")
    decoded = [decode_docs(p, tok) for p in list_shards(tmp_path / f"tok{VOCAB}")]
    assert decoded == [[s for s in shard if s] for shard in stories]


def test_single_shard_holds_out_every_100th_story(tmp_path):
    stories = make_stories(250, seed=2)
    write_tinystories(tmp_path, stories, 1)
    ts.train_vocab(tmp_path, 400)
    ts.pretokenize(tmp_path, 400)
    tok = Tokenizer(tmp_path / "tok400.model")
    val, train = (decode_docs(p, tok) for p in list_shards(tmp_path / "tok400"))
    assert val == [stories[0], stories[100], stories[200]]
    assert train == [s for i, s in enumerate(stories) if i % 100]


def test_failing_shard_fails_the_command_and_leaves_nothing(tok512, tmp_path, corpus):
    write_tinystories(tmp_path, corpus, 3)
    shutil.copy(tok512 / f"tok{VOCAB}.model", tmp_path)
    (tmp_path / TINYSTORIES_DIR / "data02.json").write_text('[{"story": "cut off', encoding="utf-8")
    with pytest.raises(DataError, match="data02.json is not a TinyStories shard"):
        ts.pretokenize(tmp_path, VOCAB)
    assert not (tmp_path / f"tok{VOCAB}").exists()
    shutil.copy(tmp_path / TINYSTORIES_DIR / "data01.json", tmp_path / TINYSTORIES_DIR / "data02.json")
    ts.pretokenize(tmp_path, VOCAB)  # an earlier good run's shards are replaced only by a complete new set
    before = {p.name: p.read_bytes() for p in (tmp_path / f"tok{VOCAB}").iterdir()}
    (tmp_path / TINYSTORIES_DIR / "data01.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match="data01.json"):
        ts.pretokenize(tmp_path, VOCAB)
    assert {p.name: p.read_bytes() for p in (tmp_path / f"tok{VOCAB}").iterdir()} == before


def test_rerun_replaces_stale_shards(tok512, tmp_path, corpus):
    write_tinystories(tmp_path, corpus, 3)
    shutil.copy(tok512 / f"tok{VOCAB}.model", tmp_path)
    ts.pretokenize(tmp_path, VOCAB)
    shutil.rmtree(tmp_path / TINYSTORIES_DIR)
    write_tinystories(tmp_path, corpus[:300], 2)
    ts.pretokenize(tmp_path, VOCAB)
    assert [p.name for p in list_shards(tmp_path / f"tok{VOCAB}")] == ["data00.bin", "data01.bin"]
    assert read_meta(tmp_path / f"tok{VOCAB}")["num_stories"] == sum(1 for s in corpus[:300] if s.strip())


# -----------------------------------------------------------------------------
# prepare: the user's own data

def prepare_and_decode(data_dir, input, name="mine", fmt="auto"):
    ts.prepare(data_dir, input, name, VOCAB, fmt=fmt)
    tok = Tokenizer(read_meta(data_dir / name)["tokenizer"])
    return [decode_docs(p, tok) for p in list_shards(data_dir / name)]


def held_out(docs):
    return [[d for i, d in enumerate(docs) if i % 100 == 0], [d for i, d in enumerate(docs) if i % 100]]


@pytest.mark.parametrize("fmt", ["endoftext", "jsonl", "json", "dir", "completion", "forced"])
def test_prepare_formats(tok512, tmp_path, fmt):
    docs = make_stories(150, seed=4)
    if fmt in ("completion", "forced"):  # a completion field; beside a prompt, plain text when forced
        src = tmp_path / "in.jsonl"
        prompt = {"prompt": "Tell a story."} if fmt == "forced" else {}
        src.write_text("".join(json.dumps(prompt | {"completion": d}) + "\n" for d in docs), encoding="utf-8")
    elif fmt == "endoftext":
        write_endoftext(tmp_path / "in.txt", docs)
        src = tmp_path / "in.txt"
    elif fmt == "jsonl":
        src = tmp_path / "in.jsonl"
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    elif fmt == "json":
        src = tmp_path / "in.json"
        src.write_text(json.dumps([{"story": d} for d in docs]), encoding="utf-8")
    else:  # a directory: files in name order, hidden files skipped
        src = tmp_path / "in"
        (src / "b").mkdir(parents=True)
        write_endoftext(src / "a.txt", docs[:50])
        lines = "".join(json.dumps({"text": d}) + "\n" for d in docs[50:])
        (src / "b" / "c.jsonl").write_text(lines, encoding="utf-8")
        (src / ".hidden.txt").write_text("not data", encoding="utf-8")
    shutil.copy(tok512 / f"tok{VOCAB}.model", tmp_path)
    val, train = prepare_and_decode(tmp_path, src, fmt="text" if fmt == "forced" else "auto")
    assert [val, train] == held_out(docs)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["data00.bin", "data01.bin", "meta.json"]
    meta = read_meta(tmp_path / "mine")
    assert meta["num_stories"] == 150 and meta["val_shard"] == "data00.bin"


def test_prepare_takes_its_validation_split_from_val_input_or_val_fraction(tok512, tmp_path, capsys):
    docs, own = make_stories(40, seed=8), make_stories(12, seed=9)
    write_endoftext(tmp_path / "in.txt", docs)
    write_endoftext(tmp_path / "valid.txt", own)
    shutil.copy(tok512 / f"tok{VOCAB}.model", tmp_path)
    tok = Tokenizer(str(tmp_path / f"tok{VOCAB}.model"))
    decoded = lambda: [decode_docs(p, tok) for p in list_shards(tmp_path / "mine")]
    common = ["prepare", "--input", str(tmp_path / "in.txt"), "--name", "mine", "--vocab_size", str(VOCAB),
              "--data_dir", str(tmp_path)]
    assert ts.main(common + ["--val_input", str(tmp_path / "valid.txt")]) == 0
    assert decoded() == [own, docs]  # all of the own validation file, every document of --input trains
    own_file = str((tmp_path / "valid.txt").resolve())
    assert read_meta(tmp_path / "mine")["validation"] == {"val_input": own_file}  # for eval.py --held_out
    assert ts.main(common + ["--val_fraction", "0.2"]) == 0
    assert decoded() == [docs[::5], [d for i, d in enumerate(docs) if i % 5]]
    assert read_meta(tmp_path / "mine")["validation"] == {"val_fraction": 0.2}
    capsys.readouterr()
    for extra, message in ((["--val_fraction", "0.2", "--val_input", str(tmp_path / "valid.txt")],
                            "--val_input is the whole validation split: leave out --val_fraction"),
                           (["--val_fraction", "1"], "--val_fraction=1.0 must be between 0 and 1"),
                           (["--val_input", str(tmp_path / "valid.txt"), "--words_from_story", "3"],
                            None)):
        code = ts.main(common + extra)
        if message is None:  # instruction records from both files: the same kind, accepted
            assert code == 0 and "instruction" in read_meta(tmp_path / "mine")
            continue
        err = capsys.readouterr().err
        assert code == 1 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    (tmp_path / "valid.jsonl").write_text(json.dumps({"prompt": "Hi", "response": "Hello."}) + "\n",
                                          encoding="utf-8")
    with pytest.raises(DataError, match=r"--val_input .*valid.jsonl holds chat instruction records but "
                                        r"--input .*in.txt holds plain text: give validation data of the "
                                        r"same kind"):
        ts.prepare(tmp_path, tmp_path / "in.txt", "mine", VOCAB, val_input=tmp_path / "valid.jsonl")


def test_prepare_warns_of_a_validation_split_shorter_than_a_context_window(tok512, tmp_path, capsys):
    write_endoftext(tmp_path / "in.txt", make_stories(150, seed=4))
    shutil.copy(tok512 / f"tok{VOCAB}.model", tmp_path)
    for fraction in (None, 0.5):  # two stories held out, then 75
        ts.prepare(tmp_path, tmp_path / "in.txt", "mine", VOCAB, val_fraction=fraction)
        val_tokens = read_meta(tmp_path / "mine")["shards"]["data00.bin"]["tokens"]
        warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
        assert (val_tokens <= ts.LONGEST_CONTEXT) == (fraction is None)
        assert warnings == ([f"warning: the validation split data00.bin holds only {val_tokens:,} tokens, "
                             f"less than one context window (max_seq_len=1024, +1): train.py refuses a "
                             f"max_seq_len of {val_tokens:,} or more on it; hold out more (--val_fraction) "
                             f"or give --val_input FILE"] if fraction is None else [])
    # as it says: the longest window the validation split holds is one token shorter than the split
    BatchLoader(tmp_path / "mine", "val", 1, val_tokens - 1, 0, vocab_size=VOCAB)
    with pytest.raises(DataError, match="use a smaller max_seq_len"):
        BatchLoader(tmp_path / "mine", "val", 1, val_tokens, 0, vocab_size=VOCAB)


def test_prepare_says_when_it_finds_no_instruction_fields(tok512, tmp_path, capsys):
    # TinyStories-style JSON with only stories: plain shards, and how to make instructions of them
    src = tmp_path / "in.json"
    src.write_text(json.dumps([{"story": d} for d in make_stories(30, seed=4)]), encoding="utf-8")
    shutil.copy(tok512 / f"tok{VOCAB}.model", tmp_path)
    ts.prepare(tmp_path, src, "mine", VOCAB)
    note = (f"note: no instruction fields in {src} (Words:/Summary: lines, prompt/response, messages, ...): "
            "plain shards for pretraining; for instruction tuning, --words_from_story=3 makes Words: records "
            "of its stories")
    assert note in capsys.readouterr().out.splitlines() and "instruction" not in read_meta(tmp_path / "mine")
    ts.prepare(tmp_path, src, "mine", VOCAB, words_from_story=3)
    assert "note: no instruction" not in capsys.readouterr().out
    assert "instruction" in read_meta(tmp_path / "mine")


def test_prepare_plain_text_is_cut_into_chunks(tok512, tmp_path):
    text = "\n\n".join(make_stories(60, seed=5))
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    shutil.copy(tok512 / f"tok{VOCAB}.model", tmp_path)
    val, train = prepare_and_decode(tmp_path, tmp_path / "book.txt")
    chunks = chunk_text(text, size=1000)
    assert len(chunks) > 10 and all(len(c) <= 1000 for c in chunks)
    assert " ".join(chunks).split() == text.split()  # nothing lost, cut only at whitespace
    assert [val, train] == held_out(chunks)


def test_train_vocab_on_own_data_then_prepare(tmp_path):
    write_endoftext(tmp_path / "in.txt", make_stories(300, seed=6))
    for command in ("train_vocab", "prepare"):
        assert ts.main([command, "--input", str(tmp_path / "in.txt"), "--name", "mine", "--vocab_size", "320",
                        "--data_dir", str(tmp_path)]) == 0
    meta = read_meta(dataset_dir(tmp_path, "mine", "custom", 320))
    assert meta["tokenizer"] == str((tmp_path / "mine" / "tok320.model").resolve())
    assert meta["vocab_size"] == 320


def test_train_vocab_warns_when_the_text_is_small_for_the_vocabulary(tmp_path, capsys):
    write_endoftext(tmp_path / "in.txt", make_stories(200, seed=6))
    size = len((tmp_path / "in.txt").read_text(encoding="utf-8"))
    for vocab_size, warned in ((512, False), (768, True)):
        ts.train_vocab(tmp_path, vocab_size, input=tmp_path / "in.txt", name="mine")
        out, err = capsys.readouterr()
        chars = int(re.search(r"stories \(([\d,]+) characters\)", out)[1].replace(",", ""))
        assert 0.9 * size < chars < size  # counted, not rounded to "0.1 M"; less the held-out stories
        assert chars > ts.MIN_CHARS_PER_PIECE * 512 and chars < ts.MIN_CHARS_PER_PIECE * 768
        warnings = [line for line in err.splitlines() if line.startswith("warning")]
        assert warnings == ([f"warning: 768 pieces is a large vocabulary for {chars:,} characters of text "
                             f"({chars / 768:.0f} per piece): most pieces will be too rare in it for a model "
                             f"to learn; give it at least 76,800 characters, or use --vocab_size 512"]
                            if warned else [])


def test_prepare_large_input_gives_several_train_shards(tok512, tmp_path, monkeypatch):
    monkeypatch.setattr(ts, "SHARD_CHARS", 20_000)
    docs = make_stories(400, seed=7)
    write_endoftext(tmp_path / "in.txt", docs)
    shutil.copy(tok512 / f"tok{VOCAB}.model", tmp_path)
    val, *train = prepare_and_decode(tmp_path, tmp_path / "in.txt")
    assert len(train) > 3 and [val, sum(train, [])] == held_out(docs)


# -----------------------------------------------------------------------------
# errors: one line that says what to run

def run_cli(*args, cwd):
    r = subprocess.run([sys.executable, str(ROOT / "tinystories.py"), *args], cwd=cwd, capture_output=True,
                       text=True)
    return r.returncode, r.stderr


def test_cli_errors_are_one_line(tmp_path):
    rc, err = run_cli("pretokenize", "--vocab_size", "512", cwd=tmp_path)
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "python tinystories.py download" in err
    write_tinystories(tmp_path / "data", make_stories(20), 2)
    rc, err = run_cli("pretokenize", "--vocab_size", "512", cwd=tmp_path)
    assert rc == 1 and "python tinystories.py train_vocab --vocab_size 512`" in err and err.count("\n") == 1
    rc, err = run_cli("pretokenize", cwd=tmp_path)
    assert rc == 1 and "no Llama 2 tokenizer" in err and "python tinystories.py download" in err


@pytest.mark.parametrize("args, make, command", [
    (["pretokenize"], [], "download"),
    (["train_vocab", "--vocab_size", "300"], [], "download"),
    (["pretokenize", "--vocab_size", "0"], ["stories"], "download"),  # no Llama 2 tokenizer
    (["pretokenize", "--vocab_size", "300"], ["stories"], "train_vocab --vocab_size 300"),
    (["pretokenize", "--tokenizer", "t.model"], ["stories", "damaged"], "download"),
    (["download", "--url", "t.model"], ["unpacked"], "download"),  # the folder download unpacks into is taken
])
def test_suggested_commands_keep_the_data_dir(tok512, tmp_path, monkeypatch, capsys, args, make, command):
    monkeypatch.chdir(tmp_path)
    shutil.copy(tok512 / f"tok{VOCAB}.model", tmp_path / "t.model")
    data = tmp_path / "elsewhere"
    if "stories" in make:
        write_tinystories(data, make_stories(40), 2)
    if "damaged" in make:
        (data / TINYSTORIES_DIR / "data01.json").write_text("[{\"story\": \"cut sh", encoding="utf-8")
    if "unpacked" in make:
        (data / TINYSTORIES_DIR).mkdir(parents=True)
        (data / TINYSTORIES_DIR / "notes.txt").write_text("mine", encoding="utf-8")
    assert ts.main([*args, "--data_dir", str(data)]) == 1
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert f"`python tinystories.py {command} --data_dir {data}`" in line


def test_train_vocab_keeps_sentencepiece_s_log_in_a_file(tmp_path):
    write_tinystories(tmp_path / "data", make_stories(300, seed=2), 2)
    r = subprocess.run([sys.executable, str(ROOT / "tinystories.py"), "train_vocab", "--vocab_size", "400"],
                       cwd=tmp_path, capture_output=True)  # bytes: text mode would turn each \r into a line
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "sentencepiece's log: data/tok400.log" in r.stdout.decode()
    assert "trainer_interface" in (tmp_path / "data" / "tok400.log").read_text(encoding="utf-8")
    # two progress bars, each one line redrawn with \r, instead of hundreds of log lines
    assert err.count("\n") == 2 and "trainer_interface" not in err, err
    assert re.search(r"training tok400: 100%.* 400/400 ", err), err


@pytest.mark.parametrize("args, message", [
    # token ids 0 ... 65535 fit uint16: 65,536 tokens is the largest vocabulary, and passes the check
    (["pretokenize", "--vocab_size", "65537"], "token ids are stored as uint16, so at most 65,536"),
    (["pretokenize", "--vocab_size", "65536"], "no tokenizer data/tok65536.model: run `python tinystories.py "
                                               "train_vocab --vocab_size 65536`"),
    (["train_vocab", "--vocab_size", "65537"], "--vocab_size must be between 1 and 65,536"),
    (["train_vocab", "--vocab_size", "65536"], "sentencepiece could not train a 65536-token vocabulary"),
    (["train_vocab", "--vocab_size", "300", "--input", "x.txt"], "needs --name"),
    (["prepare", "--input", "missing.txt", "--name", "mine"], "no such file or directory: missing.txt"),
    (["prepare", "--input", "in.csv", "--name", "mine"], "unsupported file type"),
    (["prepare", "--input", "in.txt", "--name", "tok512"], "reserved"),
    (["prepare", "--input", "in.txt", "--name", "../up"], "--name"),
    (["prepare", "--input", "one.txt", "--name", "mine", "--tokenizer", "t.model"], "need at least 2"),
    (["prepare", "--input", "bad.jsonl", "--name", "mine", "--tokenizer", "t.model"],
     'bad.jsonl:2: expected a string or an object with a "text"'),
    (["pretokenize", "--tokenizer", "t.model", "--vocab_size", "300"],
     "has 512 tokens, not --vocab_size 300"),
])
def test_user_errors(tok512, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    write_tinystories(tmp_path / "data", make_stories(20), 2)
    (tmp_path / "in.csv").write_text("a,b", encoding="utf-8")
    (tmp_path / "in.txt").write_text("x " * 3000, encoding="utf-8")
    (tmp_path / "one.txt").write_text("A short text.", encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no"}\n', encoding="utf-8")
    shutil.copy(tok512 / f"tok{VOCAB}.model", tmp_path / "t.model")
    assert ts.main(args) == 1
    # without the progress bars, and train_vocab's warning of a vocabulary large for the text
    err = [line for line in capsys.readouterr().err.splitlines() if line and "tokenizing into" not in line
           and "reading stories" not in line and not line.startswith("warning: ")]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


@pytest.mark.parametrize("size", [65_536, 65_537])
def test_vocab_over_uint16_is_refused(tok512, tmp_path, monkeypatch, size):
    big = Tokenizer(tok512 / f"tok{VOCAB}.model")
    big.vocab_size = size
    monkeypatch.setattr(ts, "Tokenizer", lambda path: big)
    if size == 65_536:  # ids 0 ... 65535: every one fits
        assert ts.find_tokenizer(tmp_path, 0, tokenizer=tok512 / f"tok{VOCAB}.model") is big
        return
    with pytest.raises(DataError, match="has 65,537 tokens: .* at most 65,536$"):
        ts.find_tokenizer(tmp_path, 0, tokenizer=tok512 / f"tok{VOCAB}.model")
    with pytest.raises(ValueError, match="65537 tokens: ids do not fit in uint16"):
        big.encode_documents(["Once upon a time"])


def test_data_commands_do_not_import_torch():
    code = "import sys, tinystories; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# -----------------------------------------------------------------------------
# the tokenizer

def test_tokenizer_specials_and_streaming(tok512):
    tok = Tokenizer(tok512 / f"tok{VOCAB}.model")
    sp = spm.SentencePieceProcessor(model_file=str(tok512 / f"tok{VOCAB}.model"))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (sp.bos_id(), sp.eos_id(), sp.vocab_size())
    text = "Lily saw 12 ducks.\nShe said: \u201chello, caf\u00e9!\u201d \U0001F642  The end."
    ids = tok.encode(text, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids) == text
    assert tok.encode_batch([text, "Tom"], bos=False) == [sp.encode(text), sp.encode("Tom")]
    assert "".join(tok.decode_stream(ids)) == text
    prompt, rest = ids[:4], ids[4:]  # continuing after a prompt keeps the piece's leading space
    assert tok.decode(prompt) + "".join(tok.decode_stream(rest, prev_id=prompt[-1])) == text
    ascii_ids = tok.encode("Once upon a time, Tom ran.")  # one piece per token as it arrives (BOS: none)
    pieces = list(tok.decode_stream(ascii_ids))
    assert "".join(pieces) == "Once upon a time, Tom ran." and len(pieces) == len(ascii_ids) - 1


TRICKY = ["Once  upon a\ttime,   Tom\n\nsaw 1234 ducks.",
          "\u2581ducks \u2581 x\u2581\u2581y \uff21\uff22 \ufb01sh caf\u00e9 \U0001F642.",
          "a", "Lily said: \u201cHi!\u201d", "\u00e2\u20ac\u0153mojibake\u00e2\u20ac\u009d  stays"]


def flat_batch(tok, texts):
    return [i for ids in tok.encode_batch(texts) for i in ids]


def test_encode_documents_equals_sentencepiece(tok512, corpus, llama2_tokenizer):
    texts = TRICKY + [s.strip() for s in corpus if s.strip()] * 2  # repeated words come from the table
    rng = np.random.default_rng(0)  # and random strings of spaces, "▁", newlines, letters, accents, emoji
    alphabet = list("  \u2581\n\tab.,!1\u00e9\u4e16\u3000\u00a0") + ["\U0001F642", "the", " cat", "Tom",
                                                                       "\r\n"]
    texts += ["".join(rng.choice(alphabet, rng.integers(0, 30))) for _ in range(2000)]
    texts += ["", " ", "\u2581", " \n"]
    for tok in (Tokenizer(tok512 / f"tok{VOCAB}.model"), Tokenizer(llama2_tokenizer)):
        assert tok._words_are_independent()
        assert tok.encode_documents(texts).tolist() == flat_batch(tok, texts)
        assert tok.encode_documents(TRICKY).dtype == np.uint16 and tok.encode_documents([]).size == 0


def test_encode_documents_falls_back_when_words_interact(tmp_path, corpus):
    # sentencepiece's default collapses runs of spaces: encoding words one by one would not be exact
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "collapse"),
                                   vocab_size=400, byte_fallback=True, minloglevel=2)
    tok = Tokenizer(tmp_path / "collapse.model")
    assert not tok._words_are_independent()
    assert tok.encode_documents(TRICKY).tolist() == flat_batch(tok, TRICKY)


def test_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_vocab"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_text("<html>", encoding="utf-8")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer(tmp_path / "bad.model")
