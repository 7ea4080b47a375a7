"""A rank that dies: run this file in front of train.py (torchrun runs it on every rank) and rank KILL_RANK
SIGKILLs itself as it fetches its KILL_AT-th training batch, once (MARKER remembers it across torchrun's
restarts), like a process lost to a hardware fault or the kernel's OOM killer:

    KILL_RANK=1 KILL_AT=7 MARKER=/tmp/killed torchrun --max-restarts=3 ... kill_rank.py train.py ..."""
import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from llamatiny import data

    real_next = data.BatchLoader.next_batch
    marker = os.environ["MARKER"]

    def next_batch(self):
        if (self.split == "train" and self.consumed == int(os.environ["KILL_AT"]) and self.seed < 2**31 - 1
                and int(os.environ["RANK"]) == int(os.environ["KILL_RANK"]) and not os.path.exists(marker)):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_next(self)

    data.BatchLoader.next_batch = next_batch
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
