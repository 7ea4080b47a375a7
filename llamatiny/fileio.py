"""
Writing files so that a failure never leaves half of one where a later step would take it for whole, and
is one line naming the file and the reason the OS gave: a full disk, a quota, a read-only or forbidden folder.

    with atomic_write("out/config.json") as tmp, open(tmp, "w") as f:   # all of it, or the old file
        f.write(...)
    usual_permissions("data/TinyStories_all_data")                     # a tempfile.mkdtemp folder: not 0700
    with writing("out/metrics.jsonl"), open(...) as f:                 # an OSError names the file
        f.write(...)
    check_writable("out")                                              # refused before any work is done

train.py's run folder and checkpoints, export.py's files and tinystories.py's data all go through here.
It imports neither torch nor numpy: the data commands start without them.
"""
import errno
import os
import shutil
import tempfile
from contextlib import contextmanager

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # the disk, or the user's quota, is full: free space and run again


class WriteError(OSError):
    """OSError(errno, strerror, filename) for a file that could not be written. One line as a string:
    'no space left on device writing out/ckpt.pt'."""

    def __str__(self) -> str:
        reason = self.strerror or "write failed"
        return f"{reason[:1].lower()}{reason[1:]} writing {self.filename}"


@contextmanager
def writing(path):
    # an OSError inside the block is a WriteError naming path, with the OS's reason (errno), not the byte
    # count or the temporary name some writers report
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(e.errno, e.strerror or str(e), os.fspath(path)) from None


def _fsync(path, flags=os.O_RDWR) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path):
    # `with atomic_write(p) as tmp:` gives p + ".tmp" to write; when the block succeeds it is flushed to
    # disk and renamed over p in one step, so a crash, a kill or an error (a full disk) never leaves half a
    # file behind: the .tmp is removed and p is untouched (a kill may leave the .tmp, which the next write
    # to p replaces). An OSError on the way is a WriteError naming p.
    path = os.fspath(path)
    tmp, directory = path + ".tmp", os.path.dirname(os.path.abspath(path))
    try:
        with writing(path):
            os.makedirs(directory, exist_ok=True)
            yield tmp
            _fsync(tmp)  # a disk that fills up may only say so here
            usual_permissions(tmp)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        _fsync(directory, os.O_RDONLY | os.O_DIRECTORY)


def link_or_copy(src, dst) -> None:
    """dst becomes the same bytes as src, atomically: a hard link (no space, no time), or a copy where a link
    is not possible (another filesystem)."""
    with atomic_write(dst) as tmp:
        if os.path.lexists(tmp):
            os.remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def usual_permissions(path) -> None:
    """Gives path the mode a plain open() or mkdir would: 0666 (a folder 0777) less the umask. Some writers
    create files only their owner may read (safetensors' save_file: 0600), as tempfile.mkdtemp does folders
    (0700); what we write is meant to be shared like any other file the user makes."""
    umask = os.umask(0)  # the only way to read it; set back at once
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def check_writable(directory) -> None:
    """Creates directory if needed and makes a file in it: a read-only or forbidden folder is a WriteError
    before any work is spent, not after it."""
    with writing(directory):
        os.makedirs(directory, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
