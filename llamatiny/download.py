"""
`python tinystories.py download`: TinyStories and the Llama 2 tokenizer, from Hugging Face, a mirror or files
you copied. A transfer resumes where it broke (HTTP Range), is size-checked before it is renamed into place,
and the archive is unpacked into a temporary folder that is renamed when it is whole. `--version 2` fetches
TinyStoriesV2's two text files instead of the archive, from the same places, checked to be its stories.
"""
import codecs
import os
import re
import shutil
import socket
import sys
import tarfile
import tempfile
import time
import urllib.parse
import zlib
from functools import partial
from pathlib import Path

from tqdm import tqdm

from llamatiny.data import TINYSTORIES_DIR, DataError, data_command, list_shards
from llamatiny.fileio import WriteError, atomic_write, check_writable, usual_permissions, writing
from llamatiny.tokenizer import Tokenizer

ARCHIVE = "TinyStories_all_data.tar.gz"
HF_FOLDER = "datasets/roneneldan/TinyStories/resolve/main/"
TINYSTORIES_PATH = HF_FOLDER + ARCHIVE
# TinyStoriesV2: the GPT-4 stories only, as text with a line <|endoftext|> after each story; its own
# validation file
V2_FILES = ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt")
LLAMA2_TOKENIZER = "llama2_tokenizer.model"  # in DATA_DIR
LLAMA2_TOKENIZER_URL = "https://raw.githubusercontent.com/karpathy/llama2.c/master/tokenizer.model"
MIRRORS = ("set HF_ENDPOINT to a mirror of huggingface.co, or pass --url and --tokenizer_url (a mirror's "
           f"URLs, or files you copied), or --url FOLDER/ holding {ARCHIVE} and tokenizer.model")
V2_NAME = "tinystories_v2"  # the dataset name the printed next step gives prepare
RETRY_WAIT_S = 2.0  # pause before resuming a broken transfer (tests set 0)



def default_url(version: int = 1) -> str:
    """The archive's URL (version 1), or the folder holding TinyStoriesV2's files (version 2)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")  # mirrors set HF_ENDPOINT
    return f"{endpoint}/{TINYSTORIES_PATH if version == 1 else HF_FOLDER}"


def local_path(url: str) -> Path | None:
    """The file a URL names when it is a path or file:// URL; None for http(s)."""
    if url.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    if m := re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*)://", url):
        if m[1].lower() not in ("http", "https"):
            raise DataError(f"cannot download {url}: only http(s)://, file:// and local paths are supported")
        return None
    return Path(url)


def mirror_files(url: str) -> tuple[str, str | None]:
    """--url names the archive, or a folder (a local one, or a URL ending in /) holding both files under
    their published names: (the archive's URL, the tokenizer's URL or None)."""
    src = local_path(url)
    if url.endswith("/") or (src is not None and src.is_dir()):
        base = url if url.endswith("/") else url + "/"
        return base + ARCHIVE, base + "tokenizer.model"
    return url, None


class _Incomplete(Exception):
    pass


def _name_not_resolved(e: BaseException) -> bool:
    # requests' ConnectionError holds urllib3's MaxRetryError, whose reason (NameResolutionError) was raised
    # from the socket.gaierror of the failed look-up
    todo, seen = [e], set()
    while todo:
        e = todo.pop()
        if isinstance(e, socket.gaierror):
            return True
        seen.add(id(e))
        todo += [x for x in (getattr(e, "reason", None), e.__cause__, e.__context__, *e.args)
                 if isinstance(x, BaseException) and id(x) not in seen]
    return False


def http_download(url: str, dest: Path, retries: int = 3, check=None) -> None:
    """Stream url to dest.part (resuming it with a Range request), size-check it, then rename it to dest."""
    import requests
    import urllib3

    part = dest.with_name(dest.name + ".part")
    broken = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
              urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, _Incomplete)
    for attempt in range(retries + 1):
        try:
            _http_attempt(requests, url, part)
            break
        except requests.HTTPError as e:
            raise DataError(f"downloading {url} failed: HTTP {e.response.status_code} {e.response.reason} "
                            "(retry later, or pass --url with a mirror or a local copy)") from None
        except WriteError as e:  # a full disk: what arrived stays in part
            raise DataError(f"{e}: free space and run the same command again, which continues the download") \
                from None
        except broken as e:
            if _name_not_resolved(e):  # no network, or no DNS: not a transfer that broke, so no retries
                host = urllib.parse.urlparse(url).hostname
                raise DataError(f"cannot reach {host} (its name does not resolve: no network?); {MIRRORS}") \
                    from None
            why = " ".join(str(e).split())[:200] or type(e).__name__
            if attempt == retries:
                kept = "run the same command again" + (f" to resume from {part}" if part.exists() else "")
                raise DataError(f"downloading {url} failed: {why} ({kept}, or pass --url with a mirror or a "
                                "local copy)") from None
            print(f"download interrupted ({why}); resuming, attempt {attempt + 2} of {retries + 1}",
                  file=sys.stderr)
            time.sleep(RETRY_WAIT_S * (attempt + 1))
    if check is not None:
        check(part)
    os.replace(part, dest)


def _http_attempt(requests, url: str, part: Path) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=(15, 60)) as r:
        if r.status_code == 416 and have:  # nothing left to send: .part is complete, or stale
            total = _content_range(r.headers.get("Content-Range"))[1]
            if total == have:
                return
            part.unlink()
            return _http_attempt(requests, url, part)
        r.raise_for_status()
        if r.status_code == 206:
            start, total = _content_range(r.headers.get("Content-Range"))
            if start != have:
                part.unlink()
                return _http_attempt(requests, url, part)
            mode = "ab"
        else:  # 200: the server ignored Range (or there was none): start over
            have, mode = 0, "wb"
            total = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=part.name.removesuffix(".part")) as bar:
            for chunk in r.raw.stream(1 << 20, decode_content=False):  # the bytes as sent, so sizes compare
                with writing(part):  # (the stream's errors are the network's)
                    f.write(chunk)
                    f.flush()  # so that closing f writes nothing more
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Incomplete(f"got {size:,} of {total:,} bytes")


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    m = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if not m:
        return None, None
    return (int(m[1]) if m[1] else None), (int(m[2]) if m[2] != "*" else None)


def safe_unpack(archive: Path, target: Path) -> int:
    """Unpack into a temporary directory beside target, then rename it: target is complete or absent."""
    if target.exists() and any(target.iterdir()):
        raise DataError(f"{target} exists but holds no dataNN.json: move it away and run "
                        f"`{data_command('download', target.parent)}` again")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    root = tmp.resolve()
    extract = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12 / 3.11.4
    try:
        with open(archive, "rb") as raw, tqdm.wrapattr(raw, "read", total=archive.stat().st_size, unit="B",
                                                       desc=f"unpacking {archive.name}", unit_scale=True,
                                                       unit_divisor=1024) as f:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    refuse = f"refusing to unpack {archive}: {member.name!r}"
                    if not (root / member.name).resolve().is_relative_to(root):
                        raise DataError(f"{refuse} would land outside {target}")
                    if not (member.isfile() or member.isdir()):
                        raise DataError(f"{refuse} is a link or a special file")
                    with writing(target):  # a full disk is not a damaged archive: keep the archive
                        tar.extract(member, root, **extract)
        shards = list_shards(tmp, "json")
        if not shards:
            raise DataError(f"{archive} holds no dataNN.json files: is it TinyStories_all_data.tar.gz?")
        usual_permissions(tmp)
        if target.exists():
            target.rmdir()  # empty, checked above
        os.rename(tmp, target)
        return len(shards)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DataError(f"cannot unpack {archive}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(data_dir, url: str | None = None, tokenizer_url: str | None = None, retries: int = 3,
             version: int = 1) -> None:
    data_dir = Path(data_dir)
    check_writable(data_dir)
    if version == 2:
        return download_v2(data_dir, url, tokenizer_url, retries)
    target = data_dir / TINYSTORIES_DIR
    url, folder_tokenizer = mirror_files(url or default_url())
    if shards := list_shards(target, "json"):
        print(f"{target} already present ({len(shards)} shards): nothing to download")
    else:
        archive = local_path(url)
        if archive is not None:  # a copy the user fetched by hand
            if not archive.is_file():
                raise DataError(f"no such file: {archive}")
        else:
            # only ever renamed here complete and size-checked
            archive = data_dir / ARCHIVE
            if archive.exists():
                print(f"{archive} already downloaded")
            else:
                print(f"downloading {url}")
                http_download(url, archive, retries)
        try:
            n = safe_unpack(archive, target)
        except DataError as e:
            if archive == data_dir / ARCHIVE:
                archive.unlink(missing_ok=True)  # ours and unusable: the next run downloads it again
                raise DataError(f"{e} (deleted it: "
                                f"run `{data_command('download', data_dir)}` again)") from None
            raise
        print(f"unpacked {n} shards into {target}")
    fetch_tokenizer(data_dir / LLAMA2_TOKENIZER, tokenizer_url or folder_tokenizer or LLAMA2_TOKENIZER_URL,
                    retries)


def download_v2(data_dir: Path, url: str | None, tokenizer_url: str | None, retries: int) -> None:
    """TinyStoriesV2's two text files into data_dir, from the folder url names (default: Hugging Face's);
    prepare --input reads them."""
    folder = url or default_url(version=2)
    src = local_path(folder)
    if not folder.endswith("/") and not (src is not None and src.is_dir()):
        raise DataError(f"--version 2 fetches two files, {' and '.join(V2_FILES)}: give --url the folder "
                        "that holds them (a local folder, or a URL ending in /)")
    folder = folder.rstrip("/") + "/"
    for name in V2_FILES:
        dest, file_url = data_dir / name, folder + name
        if dest.exists():  # only ever renamed here complete, size-checked and checked to be the stories
            print(f"{dest} already present")
        elif (src := local_path(file_url)) is None:
            print(f"downloading {file_url}")
            http_download(file_url, dest, retries, check=partial(check_v2_text, source=file_url, delete=True))
        elif not src.is_file():
            raise DataError(f"no such file: {src}")
        else:
            check_v2_text(src, src)
            with atomic_write(dest) as tmp, open(src, "rb") as f, open(tmp, "wb") as out:
                with tqdm.wrapattr(f, "read", total=src.stat().st_size, desc=f"copying {name}", unit="B",
                                   unit_scale=True, unit_divisor=1024) as read:
                    shutil.copyfileobj(read, out, 1 << 20)
            print(f"copied {src} to {dest}")
    fetch_tokenizer(data_dir / LLAMA2_TOKENIZER, tokenizer_url or (folder + "tokenizer.model" if url else
                                                                   LLAMA2_TOKENIZER_URL), retries)
    print(f"next: {data_command(f'prepare --input {data_dir / V2_FILES[0]} --name {V2_NAME}', data_dir)}")


def check_v2_text(path: Path, source, delete=False) -> None:
    # a proxy's or a mirror's error page can arrive whole, with a 200: the stories are UTF-8 text with a
    # separator within their first megabyte. delete: a download's, which the next run must fetch again
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # (a character cut at the end waits)
    except UnicodeDecodeError:
        text = ""
    if "<|endoftext|>" not in text:
        if delete:
            path.unlink()
        raise DataError(f"{source} is not TinyStoriesV2 text (UTF-8 stories, each followed by a line "
                        "<|endoftext|>): is --url the right folder?")


def fetch_tokenizer(dest: Path, url: str, retries: int) -> None:
    """The Llama 2 tokenizer, for `pretokenize --vocab_size 0` only: a failure is a note, not an error."""
    if dest.exists():
        print(f"{dest} already present")
        return

    def check(path):
        try:
            Tokenizer(path)
        except ValueError:
            raise DataError(f"{url} is not a sentencepiece model") from None

    try:
        src = local_path(url)
        if src is None:
            http_download(url, dest, retries, check)
        elif not src.is_file():
            raise DataError(f"no such file: {src}")
        else:
            check(src)
            with atomic_write(dest) as tmp:
                shutil.copyfile(src, tmp)
        print(f"saved the Llama 2 tokenizer to {dest}")
    except DataError as e:
        dest.with_name(dest.name + ".part").unlink(missing_ok=True)
        print(f"note: skipped the Llama 2 tokenizer: {e}. Only `pretokenize --vocab_size 0` needs it: "
              f"pass --tokenizer_url URL_OR_PATH, or copy it to {dest}", file=sys.stderr)
