"""
The data stage: TinyStories (or your own text) -> uint16 token shards, which llamatiny/data.py reads.
The input formats it takes are read by llamatiny/readers.py.

    python tinystories.py download                      # data/TinyStories_all_data/*.json, Llama 2 tokenizer
    python tinystories.py download --url MIRROR/        # a mirror (or a local folder) holding both files
    python tinystories.py download --version 2          # TinyStoriesV2: data/TinyStoriesV2-GPT4-*.txt
    python tinystories.py pretokenize --vocab_size 0    # Llama 2 ids: data/TinyStories_all_data/dataNN.bin
    python tinystories.py train_vocab --vocab_size 512  # data/tok512.model
    python tinystories.py pretokenize --vocab_size 512  # data/tok512/dataNN.bin

Your own text (a .txt with <|endoftext|> lines between documents, a plain .txt, a .jsonl/.json with a
"text", "story" or "completion" field, or a directory of those), then `python train.py --dataset=NAME`:

    python tinystories.py train_vocab --input my.txt --name mine --vocab_size 1024  # data/mine/tok1024.model
    python tinystories.py prepare --input my.txt --name mine --vocab_size 1024      # data/mine/dataNN.bin
    python tinystories.py prepare --input my.txt --name mine                        # or Llama 2's vocabulary

Instruction data (TinyStoriesInstruct text, TinyStories' JSON with its words/features/summary,
prompt/response, prompt/completion or chat JSONL; llamatiny/instruct.py describes them and the template) gets
a loss mask beside each shard, so that training learns the responses only, and the starts of its records, so
that every window the loader cuts holds whole records; --words_from_story=N makes such records from plain
stories:

    python tinystories.py prepare --input TinyStoriesInstruct-train.txt --name instruct  # Llama 2 vocabulary
    python tinystories.py prepare --input my.txt --name words --words_from_story 3 --vocab_size 512

Shards hold every document stripped, with BOS prepended, concatenated. data00.bin is the validation split,
the rest train (as in llama2.c). An input with a single shard, and `prepare`, hold out documents
0, 100, 200, ... as data00.bin (prepare: or --val_fraction=F of them, or all of --val_input FILE). Each
shard directory has a meta.json naming the tokenizer it was made with.
"""
import argparse
import concurrent.futures
import itertools
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llamatiny import download, instruct
from llamatiny.data import TINYSTORIES_DIR, DataError, data_command, index_name, list_shards, mask_name
from llamatiny.fileio import atomic_write, check_writable, writing
from llamatiny.readers import VAL_EVERY, InputRecords, is_val, read_json_stories
from llamatiny.tokenizer import MAX_VOCAB_SIZE, Tokenizer

# prepare warns when the validation split cannot fill one window of the longest context of config/*.py
LONGEST_CONTEXT = 1024
SHARD_CHARS = 8_000_000  # prepare: text per train shard (~2 M tokens), so that every core gets work
# train_vocab warns below this much text per piece: the pieces learned last are merges of pairs the text holds
# only a few times, which a model then sees too rarely to learn. Measured on TinyStories at 2,048 pieces:
# at 100 characters per piece half of the pieces occur fewer than 10 times in the text itself, at 200 a fifth
MIN_CHARS_PER_PIECE = 100


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# -----------------------------------------------------------------------------
# train_vocab: a sentencepiece BPE vocabulary, with llama2.c's trainer choices

def train_vocab(data_dir, vocab_size: int, num_stories: int = 100_000, input=None, name=None,
                special_tokens=(), fmt: str = "auto") -> Path:
    import sentencepiece as spm

    data_dir = Path(data_dir)
    if not 0 < vocab_size <= MAX_VOCAB_SIZE:
        raise DataError(f"--vocab_size must be between 1 and {MAX_VOCAB_SIZE:,} (token ids are stored as "
                        "uint16)")
    if bad := [t for t in special_tokens if not t or t != "".join(t.split())]:
        raise DataError(f"--special_tokens {bad[0]!r}: a special token is text without spaces, e.g. Story: "
                        "or <|endoftext|>")
    if input is not None:
        if name is None:
            raise DataError("train_vocab --input needs --name NAME (the vocabulary goes to DATA_DIR/NAME/, "
                            "where `prepare --name NAME` finds it)")
        check_name(name)
        out = data_dir / name / f"tok{vocab_size}.model"
        source = InputRecords(input, fmt)
        # fit on training data only; instruction records as the text of their template
        docs = (d if isinstance(d, str) else instruct.record_text(source.template, d)
                for i, d in enumerate(source) if not is_val(i))
    else:
        out = data_dir / f"tok{vocab_size}.model"
        docs = _tinystories_train_stories(data_dir)
    check_writable(out.parent)
    sample = list(tqdm(itertools.islice(docs, num_stories), desc="reading stories", unit=" stories"))
    if not sample:
        raise DataError(f"no documents to train on in {input or data_dir / TINYSTORIES_DIR}")
    # one sentence per line, as llama2.c feeds the trainer (newlines become byte-fallback tokens)
    lines = [line for doc in sample for line in doc.split("\n") if line.strip()]
    log = out.with_suffix(".log")
    chars = sum(map(len, lines))
    print(f"training a {vocab_size}-token BPE vocabulary on {len(sample):,} stories ({chars:,} characters); "
          f"sentencepiece's log: {log}", flush=True)
    if chars < MIN_CHARS_PER_PIECE * vocab_size:
        advice = f"give it at least {MIN_CHARS_PER_PIECE * vocab_size:,} characters"
        fits = 2 ** int(math.log2(max(chars // MIN_CHARS_PER_PIECE, 1)))
        if fits >= 512:  # (the byte pieces alone take 259)
            advice += f", or use --vocab_size {fits}"
        print(f"warning: {vocab_size:,} pieces is a large vocabulary for {chars:,} characters of text "
              f"({chars / vocab_size:.0f} per piece): most pieces will be too rare in it for a model to "
              f"learn; {advice}", file=sys.stderr, flush=True)
    model = _BytesSink()
    t0 = time.time()
    try:
        with sentencepiece_log(log, vocab_size):
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
                input_format="text", character_coverage=1.0, num_threads=cpu_count(),
                split_digits=True, allow_whitespace_only_pieces=True, byte_fallback=True,
                normalization_rule_name="identity", user_defined_symbols=list(special_tokens),
                # unlike llama2.c's vocabularies, keep runs of spaces (as Llama 2's own model does): shards
                # decode back to exactly the text
                remove_extra_whitespaces=False,
            )  # the learned pieces do not depend on num_threads (only the options' copy saved in the model)
    except RuntimeError as e:  # e.g. a vocabulary too small for the characters of the text
        raise DataError(f"sentencepiece could not train a {vocab_size}-token vocabulary: {e} "
                        f"(its log: {log})") from None
    with atomic_write(out) as tmp:
        Path(tmp).write_bytes(model.data)
    tok = Tokenizer(out)
    probe = sample[:1000]
    chars_per_token = sum(map(len, probe)) / sum(map(len, tok.encode_batch(probe, bos=False)))
    print(f"wrote {out} in {time.time() - t0:.1f} s ({chars_per_token:.2f} characters per token on the "
          "sample)")
    return out


class _BytesSink:
    def write(self, data: bytes) -> None:
        self.data = data


@contextmanager
def sentencepiece_log(path: Path, vocab_size: int):
    # sentencepiece's trainer logs hundreds of lines to stderr, below Python: send file descriptor 2 to
    # path, and show one progress bar of the vocabulary's pieces instead, read back from that log
    terminal = os.fdopen(os.dup(2), "w")
    done = threading.Event()
    with open(path, "w", encoding="utf-8") as log, terminal, \
            tqdm(total=vocab_size, unit=" pieces", desc=f"training {path.stem}", file=terminal) as bar:
        sys.stderr.flush()
        os.dup2(log.fileno(), 2)
        follower = threading.Thread(target=_follow_log, args=(path, bar, done), daemon=True)
        follower.start()
        try:
            yield
        finally:
            done.set()
            follower.join()
            os.dup2(terminal.fileno(), 2)
        bar.update(bar.total - bar.n)  # the last merges are not logged


def _follow_log(path: Path, bar, done: threading.Event) -> None:
    # pieces so far: the meta pieces (<unk>, <s>, </s>, 256 bytes), the characters, then one per merge
    # ("merges=N" in sentencepiece 0.2's BPE log lines, "size=N" in 0.1's)
    metas = alphabet = 0
    line = ""
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            line += f.readline()
            if not line.endswith("\n"):  # nothing new, or half a line so far
                if done.is_set():
                    return
                time.sleep(0.1)
                continue
            if "Adding meta_piece" in line:
                metas += 1
            elif m := re.search(r"Alphabet size=(\d+)", line):
                alphabet = int(m[1])
            elif m := re.search(r"\b(?:merges|size)=(\d+)", line):
                bar.update(max(0, min(metas + alphabet + int(m[1]), bar.total) - bar.n))
            line = ""


def tinystories_shards(data_dir: Path) -> list[Path]:
    src = data_dir / TINYSTORIES_DIR
    if not (shards := list_shards(src, "json")):
        raise DataError(f"no TinyStories data (dataNN.json) in {src}: "
                        f"run `{data_command('download', data_dir)}`")
    return shards


def _tinystories_train_stories(data_dir: Path) -> Iterator[str]:
    shards = tinystories_shards(data_dir)
    if len(shards) == 1:  # the held-out validation stories stay out of the vocabulary sample
        return (s for i, s in enumerate(read_json_stories(shards[0])) if not is_val(i))
    return itertools.chain.from_iterable(map(read_json_stories, shards[1:]))


def check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise DataError(f"--name {name!r}: use letters, digits, '_', '-' and '.' (it becomes a directory in "
                        "DATA_DIR)")
    if name in ("tinystories", TINYSTORIES_DIR) or re.fullmatch(r"tok\d+", name):
        raise DataError(f"--name {name!r} is reserved for the TinyStories shards: pick another name")


# -----------------------------------------------------------------------------
# pretokenize / prepare: documents -> uint16 shards, in a process pool

def find_tokenizer(data_dir: Path, vocab_size: int, tokenizer=None, name=None) -> Tokenizer:
    if vocab_size < 0 or vocab_size > MAX_VOCAB_SIZE:
        raise DataError(f"--vocab_size {vocab_size}: token ids are stored as uint16, so at most "
                        f"{MAX_VOCAB_SIZE:,} (0 = Llama 2)")
    if tokenizer is not None:
        path = Path(tokenizer)
    elif vocab_size == 0:
        path = data_dir / download.LLAMA2_TOKENIZER
        if not path.is_file():
            raise DataError(f"no Llama 2 tokenizer at {path}: run `{data_command('download', data_dir)}`, "
                            "or pass --tokenizer PATH")
    else:
        model = f"tok{vocab_size}.model"
        candidates = ([data_dir / name / model] if name else []) + [data_dir / model]
        if not (found := [p for p in candidates if p.is_file()]):
            fit = f" --input YOUR_TEXT --name {name}" if name else ""
            raise DataError(f"no tokenizer {candidates[0]}: run "
                            f"`{data_command(f'train_vocab --vocab_size {vocab_size}{fit}', data_dir)}`")
        path = found[0]
    try:
        tok = Tokenizer(path)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from None
    if tok.vocab_size > MAX_VOCAB_SIZE:
        raise DataError(f"{path} has {tok.vocab_size:,} tokens: token ids are stored as uint16, so at most "
                        f"{MAX_VOCAB_SIZE:,}")
    if vocab_size and tok.vocab_size != vocab_size:
        raise DataError(f"{path} has {tok.vocab_size:,} tokens, not --vocab_size {vocab_size}")
    if tok.bos_id < 0:
        raise DataError(f"{path} has no BOS token, which every document starts with")
    return tok


def pretokenize(data_dir, vocab_size: int = 0, tokenizer=None) -> Path:
    data_dir = Path(data_dir)
    src = data_dir / TINYSTORIES_DIR
    shards = tinystories_shards(data_dir)
    tok = find_tokenizer(data_dir, vocab_size, tokenizer)
    out = src if vocab_size == 0 else data_dir / f"tok{vocab_size}"
    if len(shards) == 1:  # one shard: hold out every VAL_EVERY-th story as the validation shard
        size = shards[0].stat().st_size
        jobs = [("data00.bin", ("json", shards[0], "val"), size // 2),
                ("data01.bin", ("json", shards[0], "train"), size // 2)]
    else:
        jobs = [(f"data{i:02d}.bin", ("json", p, None), p.stat().st_size) for i, p in enumerate(shards)]
    total = sum(weight for *_, weight in jobs)
    # biggest first, so that the last job to start is a small one and all cores stay busy to the end
    jobs.sort(key=lambda job: -job[2])
    return write_shards(out, jobs, tok, total, num_jobs=len(jobs), source=src)


def prepare(data_dir, input, name: str, vocab_size: int = 0, tokenizer=None, fmt: str = "auto",
            words_from_story: int = 0, val_input=None, val_fraction: float | None = None) -> Path:
    """--input -> DATA_DIR/NAME/dataNN.bin. The validation split data00.bin is every hundredth document of
    --input, the share val_fraction of them (spread evenly), or all of val_input (then none of --input)."""
    data_dir = Path(data_dir)
    check_name(name)
    if val_input is not None and val_fraction is not None:
        raise DataError("--val_input is the whole validation split: leave out --val_fraction")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise DataError(f"--val_fraction={val_fraction} must be between 0 and 1 (0.2: every fifth document)")
    source = InputRecords(input, fmt, words_from_story)  # fail on a bad --input before any work
    val_source = InputRecords(val_input, fmt, words_from_story) if val_input is not None else None
    tok = find_tokenizer(data_dir, vocab_size, tokenizer, name)
    total = sum(p.stat().st_size for p in source.files + (val_source.files if val_source else []))
    jobs = _prepare_jobs(source, input, tok, val_source, val_fraction or 1 / VAL_EVERY)
    # meta.json's record of the split, for eval.py --held_out (--val_fraction) to measure the same documents
    split = ({"val_input": str(Path(val_input).resolve())} if val_source is not None
             else {"val_fraction": val_fraction or 1 / VAL_EVERY})
    out = write_shards(data_dir / name, jobs, tok, total, num_jobs=None, source=Path(input), records=source,
                       split=split)
    if fmt == "auto" and source.template is None:
        print(f"note: no instruction fields in {input} (Words:/Summary: lines, prompt/response, messages, "
              "...): plain shards for pretraining; for instruction tuning, --words_from_story=3 makes Words: "
              "records of its stories")
    return out


def _prepare_jobs(source: InputRecords, input, tok: Tokenizer, val_source: InputRecords | None,
                  val_fraction: float) -> Iterator[tuple[str, tuple, int]]:
    # the validation split data00.bin: val_source's documents (or records), else the share val_fraction of
    # source's
    val, train, chars, shard = [], [], 0, 1
    job = lambda items: ("records", source.template, items) if source.template else ("docs", items)
    size = lambda item: len(item) if isinstance(item, str) else sum(len(m["content"]) for m in item)
    for i, item in enumerate(source):
        if i == 0 and source.template and tok.eos_id < 0:
            raise DataError(f"{tok.model_path} has no EOS token, "
                            "which ends every response of instruction data")
        if val_source is None and is_val(i, val_fraction):
            val.append(item)
            continue
        train.append(item)
        chars += size(item)
        if chars >= SHARD_CHARS:
            yield f"data{shard:02d}.bin", job(train), chars
            train, chars, shard = [], 0, shard + 1
    what = "instruction record" if source.template else "document"
    if train:
        yield f"data{shard:02d}.bin", job(train), chars
    elif shard == 1:
        need = "at least 2, one of them held out for validation" if val_source is None else "at least 1"
        raise DataError(f"{input} holds {len(val)} {what}(s): need {need}")
    if val_source is not None:
        val = list(val_source)
        kind = lambda records: f"{records.template} instruction records" if records.template else "plain text"
        if val_source.template != source.template:
            raise DataError(f"--val_input {val_source.files[0]} holds {kind(val_source)} but --input "
                            f"{source.files[0]} holds {kind(source)}: give validation data of the same kind")
        if not val:
            raise DataError(f"--val_input {val_source.files[0]} holds no {what}s")
        source.skips.merge(val_source.skips)
        source.formats += val_source.formats
    yield "data00.bin", job(val), sum(map(size, val))


def write_shards(out_dir: Path, jobs: Iterable[tuple[str, tuple, int]], tok: Tokenizer, total: int,
                 num_jobs: int | None, source: Path, records: InputRecords | None = None,
                 split: dict | None = None) -> Path:
    """Encode jobs (shard name, source, weight) in a process pool. Shards (and the loss masks and record
    starts of instruction records, dataNN.mask and dataNN.idx) are written under temporary names and renamed
    into place only when every job succeeded; meta.json comes last."""
    t0 = time.time()
    check_writable(out_dir)  # a read-only folder is refused before any tokenizing
    cpus = cpu_count()
    procs = min(cpus, num_jobs or cpus)
    threads = max(1, cpus // procs)  # few jobs: sentencepiece's own threads use the spare cores
    print(f"encoding with {tok.model_path} ({tok.vocab_size:,} tokens) in {procs} processes")
    # load and check the tokenizer once, here: forked workers inherit it (spawned ones load their own)
    global _worker_tok
    _worker_tok = tok
    tok.encode_documents([])  # runs its one-time check of the vocabulary
    pool = concurrent.futures.ProcessPoolExecutor(procs, initializer=_init_worker,
                                                  initargs=(tok.model_path, threads))
    pending, results, tmps = {}, {}, []
    try:
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"tokenizing into {out_dir}") as bar:
            for name, job, weight in jobs:
                tmps += [out_dir / f"{n}.tmp" for n in (name, mask_name(name), index_name(name))]
                pending[pool.submit(_encode_job, job, str(tmps[-3]))] = (name, weight)
                if len(pending) >= 2 * procs:  # prepare reads its input as it goes: bound what waits
                    _collect(pending, results, bar, concurrent.futures.FIRST_COMPLETED)
            _collect(pending, results, bar, concurrent.futures.ALL_COMPLETED)
            bar.update(bar.total - bar.n)
    except BaseException as e:
        pool.shutdown(wait=True, cancel_futures=True)
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        if not any(out_dir.iterdir()):
            out_dir.rmdir()
        if isinstance(e, concurrent.futures.process.BrokenProcessPool):
            raise DataError(f"a tokenizer worker died (out of memory?) while writing {out_dir}") from None
        raise
    pool.shutdown()

    (out_dir / "meta.json").unlink(missing_ok=True)  # no meta.json while the shard set changes
    for old in list_shards(out_dir):
        if old.name not in results:
            old.unlink()  # left by an earlier run with more shards
            (out_dir / mask_name(old.name)).unlink(missing_ok=True)
            (out_dir / index_name(old.name)).unlink(missing_ok=True)
    for name, (_, _, counted) in results.items():
        os.replace(out_dir / f"{name}.tmp", out_dir / name)
        for extra in (out_dir / mask_name(name), out_dir / index_name(name)):
            if counted is None:
                extra.unlink(missing_ok=True)  # an earlier run's instruction data
            else:
                os.replace(f"{extra}.tmp", extra)
    names = [p.name for p in list_shards(out_dir)]
    stories, tokens = (sum(results[n][k] for n in names) for k in (0, 1))
    meta = {"tokenizer": tok.model_path, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "num_stories": stories, "num_tokens": tokens, "dtype": "uint16",
            "source": str(Path(source).resolve()), "val_shard": names[0],
            "shards": {n: {"stories": results[n][0], "tokens": results[n][1]} for n in names}}
    if split is not None:
        meta["validation"] = split
    counted = ""
    if records is not None and records.template:
        loss_tokens = sum(results[n][2] for n in names)
        for n in names:
            meta["shards"][n]["loss_tokens"] = results[n][2]
        meta["instruction"] = {"template": instruct.template_info(records.template),
                               "formats": sorted(set(records.formats)), "records": stories,
                               "loss_tokens": loss_tokens, "skipped": dict(records.skips.reasons)}
        counted = f"; loss on {loss_tokens / tokens:.0%} of them (the responses), {records.template} template"
        if records.skips.reasons:
            print(records.skips.summary())
    with atomic_write(out_dir / "meta.json") as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    val_tokens = results[names[0]][1]
    if not counted and val_tokens <= LONGEST_CONTEXT:  # (instruction windows are padded: any record fits)
        print(f"warning: the validation split {names[0]} holds only {val_tokens:,} tokens, less than one "
              f"context window (max_seq_len={LONGEST_CONTEXT}, +1): train.py refuses a max_seq_len of "
              f"{val_tokens:,} or more on it; hold out more (--val_fraction) or give --val_input FILE")
    dt = time.time() - t0
    what, whats = ("instruction record", "instruction records") if counted else ("story", "stories")
    print(f"wrote {len(names)} shards to {out_dir}: {stories:,} {whats}, {tokens:,} tokens{counted} "
          f"({tokens / max(stories, 1):.1f} per {what}; validation {names[0]}: {results[names[0]][1]:,} "
          "tokens) "
          f"in {dt:.1f} s ({tokens / dt / 1e6:.2f} M tokens/s)")
    return out_dir


def _collect(pending: dict, results: dict, bar, return_when) -> None:
    done, _ = concurrent.futures.wait(pending, return_when=return_when)
    for future in done:
        name, weight = pending.pop(future)
        results[name] = future.result()  # re-raises a worker's exception: a failing shard fails the command
        bar.update(weight)


_worker_tok: Tokenizer | None = None
_worker_threads = 1


def _init_worker(model_path: str, threads: int) -> None:
    global _worker_tok, _worker_threads
    if _worker_tok is None or _worker_tok.model_path != model_path:
        _worker_tok = Tokenizer(model_path)
    _worker_threads = threads


def _encode_job(job: tuple, out_path: str) -> tuple[int, int, int | None]:
    """Writes a shard (and for instruction records its mask and record starts); returns (documents, tokens,
    tokens in the loss: None for plain text)."""
    mask = starts = None
    if job[0] == "json":
        _, path, part = job
        docs = read_json_stories(path)
        if part is not None:
            docs = [d for i, d in enumerate(docs) if is_val(i) == (part == "val")]
    elif job[0] == "records":
        _, template, docs = job
        tokens, mask = instruct.encode_records(_worker_tok, template, docs, num_threads=_worker_threads)
        # BOS starts each record and nothing else (sentencepiece never makes a control token from text):
        # the loader reads these starts instead of scanning for them
        starts = np.flatnonzero(tokens == _worker_tok.bos_id).astype(np.uint64)
        assert len(starts) == len(docs), "a record holds a BOS token of its own"
    else:
        docs = job[1]
    if mask is None:
        tokens = _worker_tok.encode_documents(docs, num_threads=_worker_threads)
    out = Path(out_path)  # dataNN.bin.tmp; the mask goes to dataNN.mask.tmp, the starts to dataNN.idx.tmp
    with writing(out.parent):
        for path, array in ((out, tokens), (out.with_name(mask_name(out.stem) + ".tmp"), mask),
                            (out.with_name(index_name(out.stem) + ".tmp"), starts)):
            if array is not None:
                with open(path, "wb") as f:
                    f.write(memoryview(array))  # not array.tofile(): its error on a full disk is a byte count
    return len(docs), len(tokens), None if mask is None else int(mask.sum())


# -----------------------------------------------------------------------------
# command line

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data_dir", default="data", help="where the data lives (default: data)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("download", parents=[common],
                       help="fetch and unpack TinyStories and the Llama 2 tokenizer")
    p.add_argument("--url", help=f"URL, file:// URL or local path of {download.ARCHIVE}, or of a folder "
                                 "(ending in /) holding it and tokenizer.model; with --version 2, the folder "
                                 "holding its two files "
                                 f"(default: $HF_ENDPOINT/{download.TINYSTORIES_PATH}, "
                                 "HF_ENDPOINT defaulting to https://huggingface.co)")
    p.add_argument("--tokenizer_url", help="URL or path of the Llama 2 tokenizer.model (default: the one in "
                                           f"--url's folder, else {download.LLAMA2_TOKENIZER_URL})")
    p.add_argument("--retries", type=int, default=3,
                   help="resume a broken transfer this many times (default: 3)")
    p.add_argument("--version", type=int, choices=(1, 2), default=1,
                   help=f"1 (default): {download.ARCHIVE}, unpacked into DATA_DIR/{TINYSTORIES_DIR}/, for "
                        "pretokenize; 2: TinyStoriesV2 (GPT-4 stories only), "
                        f"{' and '.join(download.V2_FILES)} in DATA_DIR, for prepare --input")

    p = sub.add_parser("train_vocab", parents=[common],
                       help="train a sentencepiece BPE vocabulary: DATA_DIR/tok{N}.model")
    p.add_argument("--vocab_size", type=int, required=True)
    p.add_argument("--num_stories", type=int, default=100_000,
                   help="train on this many stories (default: 100000)")
    p.add_argument("--input", help="fit your own text instead (see prepare): DATA_DIR/NAME/tok{N}.model")
    p.add_argument("--name", help="with --input: the dataset name you give prepare")
    p.add_argument("--special_tokens", nargs="+", default=[], metavar="TOKEN",
                   help="text that is always one token, e.g. the template's markers User: Assistant: or "
                        "<|endoftext|>")
    p.add_argument("--format", default="auto",
                   help="with --input: how to read it, as for prepare (default: auto)")

    p = sub.add_parser("pretokenize", parents=[common], help="TinyStories -> token shards")
    p.add_argument("--vocab_size", type=int, default=0,
                   help="0 (default): Llama 2 -> DATA_DIR/TinyStories_all_data/; "
                        "N: DATA_DIR/tok{N}.model -> DATA_DIR/tok{N}/")
    p.add_argument("--tokenizer", help="use this sentencepiece .model instead")

    p = sub.add_parser("prepare", parents=[common], help="your own text -> token shards in DATA_DIR/NAME/")
    p.add_argument("--input", required=True,
                   help=".txt (<|endoftext|>-separated or plain), .jsonl/.json with a \"text\", \"story\" "
                        "or \"completion\" field, or a directory of them; or instruction records (--format)")
    p.add_argument("--name", required=True, help="dataset name: train with `python train.py --dataset=NAME`")
    p.add_argument("--vocab_size", type=int, default=0,
                   help="0 (default): Llama 2; N: DATA_DIR/NAME/tok{N}.model (from train_vocab --input), "
                        "else DATA_DIR/tok{N}.model")
    p.add_argument("--tokenizer", help="use this sentencepiece .model instead")
    p.add_argument("--format", default="auto",
                   help="how to read --input: auto (default: told from its content), "
                        f"{', '.join(instruct.FORMATS)}; "
                        "all but text are instruction records, written with a loss mask "
                        "(see llamatiny/instruct.py)")
    p.add_argument("--words_from_story", type=int, default=0, metavar="N",
                   help="plain stories -> instruction records \"Words: w1, ..., wN\" + the story, "
                        "the N words picked from the story's own (see instruct.words_from_story)")
    p.add_argument("--val_input", metavar="FILE",
                   help="the validation split data00.bin, read as --input is (e.g. "
                        "TinyStoriesV2-GPT4-valid.txt); then every document of --input trains")
    p.add_argument("--val_fraction", type=float, metavar="F",
                   help="hold out this share of --input's documents, spread evenly (default 0.01: every "
                        "hundredth)")

    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            download.download(args.data_dir, args.url, args.tokenizer_url, args.retries, args.version)
        elif args.command == "train_vocab":
            train_vocab(args.data_dir, args.vocab_size, args.num_stories, args.input, args.name,
                        args.special_tokens, args.format)
        elif args.command == "pretokenize":
            pretokenize(args.data_dir, args.vocab_size, args.tokenizer)
        else:
            prepare(args.data_dir, args.input, args.name, args.vocab_size, args.tokenizer, args.format,
                    args.words_from_story, args.val_input, args.val_fraction)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
