"""
A thin wrapper around a sentencepiece model: the Llama 2 vocabulary or one from `tinystories.py train_vocab`.

    tok = Tokenizer("data/tok512.model")
    ids = tok.encode("Once upon a time")            # [tok.bos_id, ...]
    text = tok.decode(ids)
    for piece in tok.decode_stream(model.generate_stream(idx, 200), prev_id=ids[-1]):
        print(piece, end="", flush=True)            # exact text, even for multi-byte characters

    shard = tok.encode_documents(stories)          # uint16 array: BOS + ids of each story, back to back

Special ids come from the model file (never assumed to be 1 and 2).
"""
import codecs
import itertools
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

MAX_VOCAB_SIZE = 65536  # shards store token ids as uint16: ids 0 ... 65535

# A "word": a run of spaces and the non-spaces after it; spaces that end the text stay with the last
# word (sentencepiece writes spaces as U+2581 "▁", and reads a "▁" in the text as a space).
_split_words = re.compile(r"[ \u2581]+[^ \u2581]+(?:[ \u2581]+\Z)?|[ \u2581]+\Z").findall
# Text that exercises what makes words independent: runs of spaces, a literal "▁", tabs, newlines,
# digits, and characters a normalizer other than "identity" would change.
_PROBE = (" Once  upon a\ttime,   Tom\n\nsaw 1234 \u2581ducks \uff21\uff22 \ufb01sh caf\u00e9 \u4e16\u754c "
          "\U0001F642 end.  ")


class Tokenizer:
    def __init__(self, model_path: str):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer model at {path}: run `python tinystories.py download` for the Llama 2 "
                "vocabulary or `python tinystories.py train_vocab --vocab_size N` for your own"
            )
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a sentencepiece model ({e})") from None
        self.model_path = str(path.resolve())
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()  # -1 when the model has none
        self.eos_id: int = self.sp.eos_id()
        # " ⁇ " in sentencepiece's default
        self._unk_text = self.sp.decode([self.sp.unk_id()]).encode("utf-8")
        self._words = None  # encode_documents' table of distinct words

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        self._check_specials(bos, eos)
        return self.sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False,
                     num_threads: int | None = None) -> list[list[int]]:
        # sentencepiece encodes the list on its own C++ threads, far faster than a Python loop over texts
        self._check_specials(bos, eos)
        threads = num_threads or os.cpu_count() or 1
        return self.sp.encode(texts, add_bos=bos, add_eos=eos, num_threads=threads)

    def encode_documents(self, texts: list[str], num_threads: int | None = None) -> np.ndarray:
        """BOS + ids of every text, concatenated: the uint16 shard format.

        Equal to encode_batch(texts) flattened, about twice as fast: sentencepiece's BPE never merges
        across a space (no piece has "▁" after another character), so a text's ids are the ids of its
        words, and a story corpus repeats its words. Each distinct word is encoded once (with the dummy
        prefix standing in for its space) and the shard is assembled with numpy. Models where that does
        not hold (checked once, on a probe) get the plain batch encode."""
        if self.vocab_size > MAX_VOCAB_SIZE:
            raise ValueError(f"{self.model_path} has {self.vocab_size} tokens: ids do not fit in uint16")
        self._check_specials(True, False)
        threads = num_threads or os.cpu_count() or 1
        if not self._words_are_independent():
            ids = self.sp.encode(texts, add_bos=True, num_threads=threads)
            return np.fromiter(itertools.chain.from_iterable(ids), np.uint16, sum(map(len, ids)))
        if self._words is None or len(self._words.rows) > 1_000_000:  # kept across calls, within bounds
            self._words = _WordTable(self)
        out = []
        for i in range(0, len(texts), 4096):  # a batch of texts at a time bounds the memory of word lists
            words = []
            for text in texts[i:i + 4096]:
                words.append("")  # BOS
                words += _split_words(" " + text)
            out.append(self._words.ids(words, threads))
        return np.concatenate(out) if out else np.empty(0, np.uint16)

    def _words_are_independent(self) -> bool:
        if not hasattr(self, "_independent"):
            sp = self.sp
            crossing = any("\u2581" in sp.id_to_piece(i).lstrip("\u2581") for i in range(self.vocab_size))
            by_words = [i for w in _split_words(" " + _PROBE) for i in sp.encode(w[1:])]
            lossless = _PROBE.replace("\u2581", "")  # a literal "▁" decodes as a space
            self._independent = (not crossing and sp.decode(sp.encode(lossless)) == lossless
                                 and by_words == sp.encode(_PROBE))
        return self._independent

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def decode_stream(self, ids: Iterable[int], prev_id: int | None = None) -> Iterator[str]:
        # Text as the ids arrive; "".join(...) equals decode(ids) for a sequence that starts the text
        # (prev_id None) or continues after prev_id. Bytes of a multi-byte character are held back
        # until the character is complete.
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        at_start = prev_id is None
        for id in ids:
            id = int(id)
            piece = self._piece_bytes(id, strip_space=at_start or prev_id == self.bos_id)
            if not self.sp.is_control(id):
                at_start = False  # sentencepiece strips the dummy prefix of the first real piece only
            prev_id = id
            text = utf8.decode(piece)
            if text:
                yield text
        tail = utf8.decode(b"", final=True)
        if tail:
            yield tail

    def _piece_bytes(self, id: int, strip_space: bool) -> bytes:
        if self.sp.is_control(id):  # BOS, EOS, padding: no text
            return b""
        if self.sp.is_unknown(id):
            return self._unk_text
        piece = self.sp.id_to_piece(id)
        if self.sp.is_byte(id):  # byte fallback: "<0xE4>"
            return bytes([int(piece[3:5], 16)])
        text = piece.replace("\u2581", " ")  # sentencepiece writes spaces as U+2581 "▁"
        if strip_space and text.startswith(" "):
            text = text[1:]
        return text.encode("utf-8")

    def _check_specials(self, bos: bool, eos: bool) -> None:
        if bos and self.bos_id < 0:
            raise ValueError(f"{self.model_path} has no BOS token")
        if eos and self.eos_id < 0:
            raise ValueError(f"{self.model_path} has no EOS token")


class _WordTable:
    """The ids of every distinct word seen so far, back to back in one array, for encode_documents."""

    def __init__(self, tok: Tokenizer):
        self.sp = tok.sp
        self.rows = {"": 0}  # word -> row; "" stands for BOS
        self.flat = np.array([tok.bos_id], np.uint16)
        self.start, self.length = np.zeros(1, np.int64), np.ones(1, np.int64)

    def ids(self, words: list[str], threads: int) -> np.ndarray:
        if new := [w for w in dict.fromkeys(words) if w not in self.rows]:
            ids = self.sp.encode([w[1:] for w in new], num_threads=threads)  # the dummy prefix is the space
            n = np.fromiter(map(len, ids), np.int64, len(ids))
            self.start = np.concatenate([self.start, len(self.flat) + np.cumsum(n) - n])
            self.length = np.concatenate([self.length, n])
            flat = np.fromiter(itertools.chain.from_iterable(ids), np.uint16, n.sum())
            self.flat = np.concatenate([self.flat, flat])
            self.rows.update(zip(new, range(len(self.rows), len(self.rows) + len(new))))
        seq = np.fromiter(map(self.rows.__getitem__, words), np.int64, len(words))
        n = self.length[seq]
        ends = np.cumsum(n)
        # token k of word j sits at flat[start[seq[j]] + k]: one gather for the whole batch
        return self.flat[np.repeat(self.start[seq] - (ends - n), n) + np.arange(ends[-1])]
