"""A disk that fills up, at the file-write boundary: builtins.open hands out files whose writes fail with
ENOSPC once their room is used, as on a full disk (the bytes that fit are written). In-process with
disk_full(); for a command line, run this file in front of the script:

    FAULT_FILE='ckpt.*\\.pt\\.tmp$' FAULT_OPEN=2 FAULT_AFTER=4096 python disk_faults.py train.py --out_dir=...

fails the 2nd file opened for writing whose path matches FAULT_FILE after 4096 bytes (torchrun runs it on
every rank; forked workers inherit it)."""
import builtins
import errno
import os
import re
import runpy
import sys
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Full:
    # a file with `room` bytes left on its disk
    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        data = data if isinstance(data, str) else memoryview(data).cast("B")  # text, or bytes
        if len(data) > self.room:
            if self.room:  # what fits
                self.f.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_up(pattern: str, nth: int = 1, room: int = 0):
    """Replaces builtins.open: the nth file opened for writing whose path matches pattern gets `room` bytes.
    Returns the original open."""
    real_open, matched = builtins.open, [0]

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        writes = any(c in mode for c in "wax+") and not isinstance(file, int)
        if writes and re.search(pattern, os.fspath(file)):
            matched[0] += 1
            if matched[0] == nth:
                return Full(f, room)
        return f

    builtins.open = open_
    return real_open


@contextmanager
def disk_full(pattern: str, nth: int = 1, room: int = 0):
    # fill_up() in this process (and the processes it forks) for the block
    real_open = fill_up(pattern, nth, room)
    try:
        yield
    finally:
        builtins.open = real_open


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    env = os.environ
    fill_up(env["FAULT_FILE"], int(env.get("FAULT_OPEN", "1")), int(env.get("FAULT_AFTER", "0")))
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
