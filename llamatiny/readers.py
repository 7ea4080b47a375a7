"""
The input formats the data commands and eval.py read, as documents (plain text) or instruction records:

- TinyStories' own shards: a JSON list of {"story": ...} objects (read_json_stories)
- --input: a .txt with <|endoftext|> lines between documents (TinyStoriesV2), a plain .txt (one document,
  cut into chunks), a .jsonl / .json of strings or objects with a "text", "story" or "completion" field,
  instruction records in any format instruct.py knows (told apart by content), or a directory of such files
  (InputRecords)

Documents 0, 100, 200, ... of an input are its validation split (is_val), for prepare and eval.py alike.
"""
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path

from llamatiny import instruct
from llamatiny.data import DataError, data_command

VAL_EVERY = 100  # prepare and single-shard inputs: documents 0, 100, 200, ... are the validation split


def is_val(index: int, fraction: float = 1 / VAL_EVERY) -> bool:
    # spread evenly: document i is held out where i * fraction passes a whole number (0, 100, 200, ... for
    # 0.01; 0, 5, 10, ... for 0.2); the small margin keeps 0.29 * 100 on 29 despite its rounding
    return math.floor(index * fraction + 1e-9) > math.floor((index - 1) * fraction + 1e-9)


def read_json_stories(path) -> list[str]:
    """A TinyStories shard: a JSON list of {"story": ...} objects -> its stripped, non-empty stories."""
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
        if not isinstance(items, list):
            raise TypeError(f"a {type(items).__name__}, not a list")
        stories = (item["story"].strip() for item in items)
        return [s for s in stories if s]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as e:
        again = data_command("download", Path(path).parent.parent)
        raise DataError(f"{path} is not a TinyStories shard (a JSON list of objects with a \"story\"; "
                        f"{e!r}): delete it and run `{again}` again") from None


def input_files(path: Path) -> list[Path]:
    suffixes = (".txt", ".json", ".jsonl")
    if path.is_dir():
        # (meta.json: the description pretokenize and prepare write beside their shards, not text)
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix in suffixes and p.name != "meta.json"
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"no .txt, .json or .jsonl files in {path}")
        return files
    if not path.is_file():
        raise DataError(f"no such file or directory: {path}")
    if path.suffix not in suffixes:
        raise DataError(f"{path}: unsupported file type (use .txt, .json, .jsonl or a directory of them)")
    return [path]


class InputRecords:
    """The documents of --input, or its instruction records (instruct.py), file by file, in order.

    Each file's format is told from its first records (instruct.detect_format), or forced with fmt. Iterating
    yields stripped, non-empty documents (str) for plain text, else records (lists of messages); .template
    is then the instruct.py template every file must share, None for plain text. Instruction records that
    cannot be used are skipped and counted in .skips; a file with none usable is an error."""

    def __init__(self, path, fmt: str = "auto", words_from_story: int = 0):
        if fmt not in ("auto",) + instruct.FORMATS:
            raise DataError(f"--format={fmt}: choose auto, {', '.join(instruct.FORMATS)}")
        if words_from_story < 0:
            raise DataError(f"--words_from_story={words_from_story} must be >= 0 (0 = off)")
        self.files = input_files(Path(path))
        self.fmt, self.words = fmt, words_from_story
        self.template, self.formats, self.skips = None, [], instruct.Skips()

    def __iter__(self):
        for file in self.files:
            try:
                yield from self._read(file)
            except UnicodeDecodeError as e:
                raise DataError(f"{file} is not UTF-8 text ({e})") from None

    def _read(self, file: Path):
        items = _file_items(file)
        head = list(itertools.islice(items, 20))
        fmt = self.fmt if self.fmt != "auto" else instruct.detect_format([item for _, item in head])
        if self.words and fmt != "text":
            raise DataError(f"{file} holds {fmt} records: --words_from_story makes instructions from plain "
                            "stories only")
        template = "story" if self.words else instruct.TEMPLATE_OF.get(fmt)
        if self.formats and template != self.template:
            raise DataError(f"{file} holds {fmt} records but {self.files[0]} holds {self.formats[0]}: "
                            "prepare them as separate datasets, or force one reading with --format")
        self.template = template
        self.formats.append(fmt)
        skips = instruct.Skips()
        for where, item in itertools.chain(head, items):
            if fmt == "text":
                if isinstance(item, json.JSONDecodeError):
                    raise DataError(f"{where}: not JSON ({item})")
                item = _document(item, where).strip()
                if template is None:
                    if item:
                        yield item
                    continue
            if isinstance(item, str) and not item.strip():
                continue  # an empty document, or the blank text after a last <|endoftext|>
            try:
                messages = self._record(fmt, item)
            except instruct.Skip as e:
                skips.add(str(e), where)
                continue
            skips.kept += 1
            yield messages
        if template is not None and not skips.kept:
            what = skips.summary() if skips.reasons else "no records"
            raise DataError(f"{file}: nothing usable as {fmt} instruction records ({what})")
        self.skips.merge(skips)

    def _record(self, fmt: str, item) -> list[dict]:
        if isinstance(item, json.JSONDecodeError):
            raise instruct.Skip("malformed line")
        if fmt == "text":
            return instruct.words_record(item, self.words)
        return instruct.to_messages(fmt, item)


def _file_items(file: Path) -> Iterator[tuple[str, object]]:
    # (where, item): the documents of a .txt, the values of a .json / .jsonl (a json.JSONDecodeError for a
    # line that is not JSON)
    if file.suffix == ".txt":
        yield from ((f"{file}: record {i}", doc) for i, doc in enumerate(_txt_documents(file), 1))
    elif file.suffix == ".jsonl":
        yield from _jsonl_items(file)
    else:
        yield from _json_items(file)


def _txt_documents(file: Path) -> Iterator[str]:
    # Documents separated by <|endoftext|> (TinyStoriesV2); without any separator the file is one
    # document, cut into chunks so that it can be sharded and a validation part held out.
    sep, seen, lines = "<|endoftext|>", False, []
    with open(file, encoding="utf-8") as f:
        for line in f:
            if sep not in line:
                lines.append(line)
                continue
            seen = True
            first, *middle, last = line.split(sep)
            yield "".join(lines) + first
            yield from middle
            lines = [last]
    text = "".join(lines)
    if seen:
        yield text
    else:
        yield from chunk_text(text, size=min(8000, max(1000, len(text) // VAL_EVERY)))


def chunk_text(text: str, size: int) -> list[str]:
    """Pieces of at most `size` characters, cut at a paragraph, line or word break where there is one."""
    chunks = []
    while len(text) > size:
        for sep in ("\n\n", "\n", " "):
            if (cut := text.rfind(sep, size // 2, size)) > 0:
                break
        else:
            cut = size
        chunks.append(text[:cut])
        text = text[cut:]
    chunks.append(text)
    return [c.strip() for c in chunks if c.strip()]


def _jsonl_items(file: Path) -> Iterator[tuple[str, object]]:
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{file}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{file}:{lineno}", e


def _json_items(file: Path) -> Iterator[tuple[str, object]]:
    with open(file, encoding="utf-8") as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # JSON lines in a .json file
                yield from _jsonl_items(file)
                return
            raise DataError(f"{file}: not JSON ({e})") from None
    for i, obj in enumerate(items if isinstance(items, list) else [items]):
        yield f"{file}[{i}]", obj


def _document(obj, where: str) -> str:
    if isinstance(obj, str):
        return obj
    for key in ("text", "story", "completion"):
        if isinstance(obj, dict) and isinstance(obj.get(key), str):
            return obj[key]
    raise DataError(f"{where}: expected a string or an object with a \"text\", \"story\" or \"completion\" "
                    "field")
