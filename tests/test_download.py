"""`tinystories.py download` end to end against a local HTTP server on 127.0.0.1 (no network): resume,
restart when Range is ignored, server errors, no network, local paths, mirrors, HF_ENDPOINT, unsafe archives
and a full disk."""
import io
import json
import os
import re
import shlex
import socket
import subprocess
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import ROOT
from disk_faults import disk_full

import tinystories as ts
from llamatiny import download
from llamatiny.corpus import make_stories, write_endoftext, write_json_shards
from llamatiny.data import TINYSTORIES_DIR, list_shards

ARCHIVE_PATH = "/" + download.TINYSTORIES_PATH


class Handler(BaseHTTPRequestHandler):
    # behaviour is set on the server: files {path: bytes}, honour_range, cut_once, fail, log [(path, Range)]
    def do_GET(self):
        srv = self.server
        srv.log.append((self.path, self.headers.get("Range")))
        if srv.fail:
            return self.send_error(srv.fail)
        body = srv.files.get(self.path)
        if body is None:
            return self.send_error(404)
        start = 0
        if (m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")) and srv.honour_range:
            start = int(m[1])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        data = body[start:]
        if srv.cut_once:  # send half, then drop the connection
            srv.cut_once = False
            data = data[: len(data) // 2]
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.honour_range, srv.cut_once, srv.fail, srv.log = {}, True, False, None, []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    """A TinyStories-style archive and a small sentencepiece model to serve."""
    d = tmp_path_factory.mktemp("payload")
    write_json_shards(str(d / "ts" / TINYSTORIES_DIR), make_stories(400, seed=9), 4)
    ts.train_vocab(d / "ts", 300, num_stories=200)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in list_shards(d / "ts" / TINYSTORIES_DIR, "json"):
            tar.add(p, arcname=p.name)
    return {"archive": buf.getvalue(), "tokenizer": (d / "ts" / "tok300.model").read_bytes(), "dir": d}


@pytest.fixture(autouse=True)
def no_wait(monkeypatch):
    monkeypatch.setattr(download, "RETRY_WAIT_S", 0.0)


def serve(server, payload):
    server.files = {ARCHIVE_PATH: payload["archive"], "/tok.model": payload["tokenizer"]}
    return ["--url", server.url + ARCHIVE_PATH, "--tokenizer_url", server.url + "/tok.model"]


def run_download(data, *args):
    return ts.main(["download", "--data_dir", str(data), *args])


def errors(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]


def assert_complete(data, payload):
    names = [p.name for p in list_shards(data / TINYSTORIES_DIR, "json")]
    assert names == [f"data0{i}.json" for i in range(4)]
    assert (data / "TinyStories_all_data.tar.gz").read_bytes() == payload["archive"]
    assert (data / download.LLAMA2_TOKENIZER).read_bytes() == payload["tokenizer"]
    assert not [p for p in data.iterdir() if p.name.endswith(".part") or p.name.startswith(".")]


def test_download_then_second_run_does_nothing(server, payload, tmp_path, capsys):
    args = serve(server, payload)
    assert run_download(tmp_path, *args) == 0
    assert_complete(tmp_path, payload)
    requests_made = len(server.log)
    capsys.readouterr()
    assert run_download(tmp_path, *args) == 0
    assert len(server.log) == requests_made
    assert capsys.readouterr().out.count("already present") == 2


def test_interrupted_transfer_resumes_with_range(server, payload, tmp_path):
    args = serve(server, payload)
    server.cut_once = True
    assert run_download(tmp_path, *args) == 0
    assert_complete(tmp_path, payload)
    (_, first), (_, second) = [entry for entry in server.log if entry[0] == ARCHIVE_PATH]
    assert first is None and second == f"bytes={len(payload['archive']) // 2}-"


def test_server_ignoring_range_starts_over(server, payload, tmp_path):
    args = serve(server, payload)
    server.cut_once, server.honour_range = True, False
    assert run_download(tmp_path, *args) == 0
    assert_complete(tmp_path, payload)  # a 200 answer replaced the partial file instead of being appended
    assert [r for p, r in server.log if p == ARCHIVE_PATH][1].startswith("bytes=")


def test_resume_in_a_later_run(server, payload, tmp_path, capsys):
    args = serve(server, payload)
    server.cut_once = True
    assert run_download(tmp_path, *args, "--retries", "0") == 1
    [err] = errors(capsys)
    assert "run the same command again to resume" in err and "--url" in err
    part = tmp_path / "TinyStories_all_data.tar.gz.part"
    have = part.stat().st_size
    assert 0 < have < len(payload["archive"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [part.name]  # nothing a later step takes for data
    assert run_download(tmp_path, *args) == 0
    assert_complete(tmp_path, payload)
    assert [r for p, r in server.log if p == ARCHIVE_PATH][-1] == f"bytes={have}-"


def test_complete_part_file_is_renamed(server, payload, tmp_path):
    args = serve(server, payload)
    # crashed just before the rename
    (tmp_path / "TinyStories_all_data.tar.gz.part").write_bytes(payload["archive"])
    assert run_download(tmp_path, *args) == 0  # the server answers 416: nothing left to send
    assert_complete(tmp_path, payload)


def test_server_error_leaves_nothing_behind(server, payload, tmp_path, capsys):
    args = serve(server, payload)
    server.fail = 500
    assert run_download(tmp_path, *args) == 1
    [err] = errors(capsys)
    assert "HTTP 500" in err and "--url" in err
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_is_one_line(tmp_path, capsys):
    assert run_download(tmp_path, "--url", "http://127.0.0.1:9/x.tar.gz", "--retries", "0") == 1
    [err] = errors(capsys)
    assert err.startswith("error: downloading http://127.0.0.1:9/x.tar.gz failed")
    assert list(tmp_path.iterdir()) == []


def test_truncated_archive_is_not_trusted(server, payload, tmp_path, capsys):
    args = serve(server, payload)
    server.files[ARCHIVE_PATH] = payload["archive"][:-200]  # complete as far as HTTP knows
    assert run_download(tmp_path, *args) == 1
    [err] = errors(capsys)
    assert "cannot unpack" in err and f"`python tinystories.py download --data_dir {tmp_path}` again" in err
    assert list(tmp_path.iterdir()) == []


def test_local_path_and_file_url(payload, tmp_path):
    archive = tmp_path / "copy.tar.gz"
    archive.write_bytes(payload["archive"])
    tok = tmp_path / "tok.model"
    tok.write_bytes(payload["tokenizer"])
    for data, url in [(tmp_path / "a", str(archive)), (tmp_path / "b", archive.as_uri())]:
        assert run_download(data, "--url", url, "--tokenizer_url", tok.as_uri()) == 0
        assert len(list_shards(data / TINYSTORIES_DIR, "json")) == 4
        assert (data / download.LLAMA2_TOKENIZER).read_bytes() == payload["tokenizer"]
        assert not (data / "TinyStories_all_data.tar.gz").exists()  # used in place, not copied
    assert run_download(tmp_path / "c", "--url", str(tmp_path / "missing.tar.gz")) == 1


def test_hf_endpoint_sets_the_default_url(server, payload, tmp_path, monkeypatch):
    serve(server, payload)
    monkeypatch.setenv("HF_ENDPOINT", server.url + "/")
    assert download.default_url() == server.url + ARCHIVE_PATH
    assert run_download(tmp_path, "--tokenizer_url", server.url + "/tok.model") == 0
    assert_complete(tmp_path, payload)
    monkeypatch.delenv("HF_ENDPOINT")
    assert download.default_url() == "https://huggingface.co" + ARCHIVE_PATH


def test_tokenizer_failure_is_a_note(server, payload, tmp_path, capsys):
    args = serve(server, payload)
    server.files["/tok.model"] = b"<html>not a model</html>"
    assert run_download(tmp_path, *args[:2], "--tokenizer_url", server.url + "/tok.model") == 0
    assert run_download(tmp_path / "b", *args[:2], "--tokenizer_url", server.url + "/missing") == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note")]
    assert len(notes) == 2 and "not a sentencepiece model" in notes[0] and "HTTP 404" in notes[1]
    for data in (tmp_path, tmp_path / "b"):
        assert not [p for p in data.iterdir() if "tokenizer" in p.name]


def make_tar(path, member: tarfile.TarInfo, data=b"[]"):
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("data00.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"[]"))
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "hardlink"])
def test_unsafe_archives_are_refused(tmp_path, capsys, kind):
    name = {"parent": "../evil.json", "absolute": str(tmp_path / "abs.json")}.get(kind, "data01.json")
    member = tarfile.TarInfo(name)
    if kind in ("symlink", "hardlink"):
        member.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        member.linkname = "/etc/passwd" if kind == "symlink" else "data00.json"
    else:
        member.size = 2
    make_tar(tmp_path / "evil.tar.gz", member)
    data = tmp_path / "data"
    args = ["--url", str(tmp_path / "evil.tar.gz"), "--tokenizer_url", str(tmp_path / "none")]
    assert run_download(data, *args) == 1
    [err] = errors(capsys)
    assert "refusing to unpack" in err
    assert list(data.iterdir()) == []  # no target, no temporary directory
    assert not (tmp_path / "evil.json").exists() and not (tmp_path / "abs.json").exists()


# ------------------------------------------------------------ no network, mirrors, a full disk


def test_a_host_that_does_not_resolve_stops_at_once(tmp_path, payload, capsys, monkeypatch):
    def no_dns(*args, **kwargs):  # offline: the look-up of the name fails
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert run_download(tmp_path / "a", "--url", "https://huggingface.co/" + download.TINYSTORIES_PATH) == 1
    err = capsys.readouterr().err
    assert "attempt" not in err  # not retried as if a transfer had broken
    [line] = [line for line in err.splitlines() if line.startswith("error")]
    assert line.startswith("error: cannot reach huggingface.co (its name does not resolve")
    assert all(option in line for option in ("HF_ENDPOINT", "--url", "--tokenizer_url", "FOLDER/"))
    assert list((tmp_path / "a").iterdir()) == []
    # the tokenizer from its default, while the archive is a local copy: a note, at once
    (tmp_path / "copy.tar.gz").write_bytes(payload["archive"])
    assert run_download(tmp_path / "b", "--url", str(tmp_path / "copy.tar.gz")) == 0
    err = capsys.readouterr().err
    assert "attempt" not in err
    assert "note: skipped the Llama 2 tokenizer: cannot reach raw.githubusercontent.com" in err


@pytest.mark.parametrize("where", ["local folder", "mirror URL"])
def test_a_folder_serves_both_files(server, payload, tmp_path, where):
    if where == "local folder":
        folder = tmp_path / "mirror"
        folder.mkdir()
        (folder / download.ARCHIVE).write_bytes(payload["archive"])
        (folder / "tokenizer.model").write_bytes(payload["tokenizer"])
        url = str(folder)
    else:
        server.files = {f"/mirror/{download.ARCHIVE}": payload["archive"],
                        "/mirror/tokenizer.model": payload["tokenizer"]}
        url = server.url + "/mirror/"
    data = tmp_path / "data"
    assert run_download(data, "--url", url) == 0  # no --tokenizer_url: the folder's, not GitHub's
    assert len(list_shards(data / TINYSTORIES_DIR, "json")) == 4
    assert (data / download.LLAMA2_TOKENIZER).read_bytes() == payload["tokenizer"]


def test_the_readme_names_every_mirror_option_together():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    [paragraph] = [p for p in readme.split("\n\n") if "HF_ENDPOINT" in p]
    assert all(option in paragraph
               for option in ("--url", "--tokenizer_url", "FOLDER/", download.LLAMA2_TOKENIZER))


def test_one_name_for_the_llama2_tokenizer():
    # download writes it, pretokenize --vocab_size 0 reads it, and every example names that same file
    names = set()
    for path in [ROOT / "README.md", ROOT / "data" / "README.md", *ROOT.glob("*.py")]:
        names |= set(re.findall(r"data/(llama2\w*\.model)", path.read_text(encoding="utf-8")))
    assert names == {download.LLAMA2_TOKENIZER}


def test_a_full_disk_keeps_what_arrived_and_the_next_run_continues(server, payload, tmp_path, capsys):
    args = serve(server, payload)
    with disk_full(r"\.tar\.gz\.part$", room=len(payload["archive"]) // 3):
        assert run_download(tmp_path, *args) == 1
    part = tmp_path / (download.ARCHIVE + ".part")
    assert errors(capsys) == [f"error: no space left on device writing {part}: free space and run the same "
                              "command again, which continues the download"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [part.name]  # nothing a later step takes for data
    have = part.stat().st_size
    assert run_download(tmp_path, *args) == 0
    assert_complete(tmp_path, payload)
    assert [r for p, r in server.log if p == ARCHIVE_PATH][-1] == f"bytes={have}-"


def test_a_full_disk_while_unpacking_keeps_the_archive(server, payload, tmp_path, capsys):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    data = tmp_path / "data"
    data.mkdir()
    # room for the archive, not for what it unpacks to
    size_kb = (len(payload["archive"]) + 8192) // 1024
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(data)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        assert run_download(data, *serve(server, payload)) == 1
        assert errors(capsys) == [f"error: no space left on device writing {data / TINYSTORIES_DIR}"]
        # the archive is whole and kept (the next run unpacks it), and no half-unpacked folder is left
        assert sorted(p.name for p in data.iterdir()) == [download.ARCHIVE]
        assert (data / download.ARCHIVE).read_bytes() == payload["archive"]
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


# ------------------------------------------------------------ TinyStoriesV2, permissions

V2_TRAIN, V2_VALID = download.V2_FILES


@pytest.fixture(scope="module")
def v2_texts(payload):
    d = payload["dir"] / "v2"
    write_endoftext(d / V2_TRAIN, make_stories(300, seed=11))
    write_endoftext(d / V2_VALID, make_stories(40, seed=12))
    return {name: (d / name).read_bytes() for name in download.V2_FILES}


def serve_v2(server, payload, v2_texts, folder="/" + download.HF_FOLDER):
    server.files = {folder + name: data for name, data in v2_texts.items()}
    server.files[folder + "tokenizer.model"] = payload["tokenizer"]


def test_v2_from_a_local_folder_then_prepare(payload, v2_texts, tmp_path, capsys):
    folder = tmp_path / "copied"
    folder.mkdir()
    for name, data in v2_texts.items():
        (folder / name).write_bytes(data)
    (folder / "tokenizer.model").write_bytes(payload["tokenizer"])
    data = tmp_path / "data"
    assert run_download(data, "--version", "2", "--url", str(folder)) == 0
    assert {name: (data / name).read_bytes() for name in download.V2_FILES} == v2_texts
    assert (data / download.LLAMA2_TOKENIZER).read_bytes() == payload["tokenizer"]
    train = data / V2_TRAIN
    command = f"python tinystories.py prepare --input {train} --name tinystories_v2 --data_dir {data}"
    assert f"next: {command}" in capsys.readouterr().out
    assert run_download(data, "--version", "2", "--url", str(folder)) == 0  # a second run does nothing
    assert capsys.readouterr().out.count("already present") == 3
    # the step it names: the Llama 2 vocabulary (here the payload's stand-in), V2's <|endoftext|> stories
    assert ts.main(shlex.split(command)[2:]) == 0
    meta = json.loads((data / "tinystories_v2" / "meta.json").read_text(encoding="utf-8"))
    assert meta["num_stories"] == 300 and meta["vocab_size"] == 300


def test_v2_over_http_resumes_from_hf_endpoint(server, payload, v2_texts, tmp_path, monkeypatch):
    serve_v2(server, payload, v2_texts)
    server.files["/tok.model"] = payload["tokenizer"]
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    server.cut_once = True  # the train file breaks halfway: the next run resumes it with a Range request
    assert run_download(tmp_path, "--version", "2", "--tokenizer_url", server.url + "/tok.model",
                        "--retries", "0") == 1
    have = (tmp_path / (V2_TRAIN + ".part")).stat().st_size
    assert run_download(tmp_path, "--version", "2", "--tokenizer_url", server.url + "/tok.model") == 0
    assert {name: (tmp_path / name).read_bytes() for name in download.V2_FILES} == v2_texts
    assert (tmp_path / download.LLAMA2_TOKENIZER).read_bytes() == payload["tokenizer"]
    assert [r for p, r in server.log if p.endswith(V2_TRAIN)] == [None, f"bytes={have}-"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_v2_from_a_mirror_folder_url(server, payload, v2_texts, tmp_path):
    serve_v2(server, payload, v2_texts, folder="/mirror/")
    assert run_download(tmp_path, "--version", "2", "--url", server.url + "/mirror/") == 0
    assert {name: (tmp_path / name).read_bytes() for name in download.V2_FILES} == v2_texts
    assert (tmp_path / download.LLAMA2_TOKENIZER).read_bytes() == payload["tokenizer"]  # the folder's


def test_v2_refuses_what_is_not_its_stories(server, payload, v2_texts, tmp_path, capsys):
    serve_v2(server, payload, v2_texts, folder="/mirror/")
    server.files["/mirror/" + V2_VALID] = b"<html>Sign in to download</html>"  # arrives whole, with a 200
    assert run_download(tmp_path, "--version", "2", "--url", server.url + "/mirror/") == 1
    assert errors(capsys) == [f"error: {server.url}/mirror/{V2_VALID} is not TinyStoriesV2 text (UTF-8 "
                              "stories, each followed by a line <|endoftext|>): is --url the right folder?"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [V2_TRAIN]  # no .part to resume from
    # one file named where two are needed
    assert run_download(tmp_path, "--version", "2", "--url", server.url + "/mirror/" + V2_TRAIN) == 1
    [err] = errors(capsys)
    assert err.startswith("error: --version 2 fetches two files") and "--url the folder" in err


def test_what_download_writes_gets_the_usual_permissions(payload, tmp_path):
    # tempfile's folders are 0700 and some writers' files 0600; ours follow the umask, as files made by hand
    archive = tmp_path / "copy.tar.gz"
    archive.write_bytes(payload["archive"])
    old = os.umask(0o027)
    try:
        assert run_download(tmp_path / "data", "--url", str(archive), "--tokenizer_url", str(archive)) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "data" / TINYSTORIES_DIR).stat().st_mode & 0o777 == 0o750
