import subprocess
import sys

import pytest
from conftest import ROOT

FAULTS_ON_REALLOCATION = """
import resource, sys, torch, cpu_speedups
import model, tinystories  # the heap train.py's process has when main() applies the setting
applied = cpu_speedups.keep_freed_memory() if sys.argv[1] == "on" else None  # "off": glibc's defaults
def allocate_and_free():  # as a training step does with its logits: 256 MB, every page written, freed
    x = torch.ones(64 * 2**20)
    del x
for _ in range(6):  # the heap settles after a few rounds (small allocations land in the freed block)
    allocate_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    allocate_and_free()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_reuses_large_blocks_without_page_faults():
    # glibc maps a block this large fresh from the kernel each time: 65,536 zeroed pages to fault in
    faults = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", FAULTS_ON_REALLOCATION, mode], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
        if out[0] == "False":
            pytest.skip("not glibc: keep_freed_memory() has nothing to tune here")
        faults[mode] = int(out[1])
    assert faults["off"] > 4 * 60_000  # 4 x 256 MB / 4 KB pages
    assert faults["on"] < 1_000  # the freed block is served again, already in memory
