import os
import subprocess
import sys

import pytest
from conftest import ROOT

from llamatiny import settings
from model import ModelArgs


def test_largest_that_fits_doubles_then_bisects():
    calls = []

    def fits(n):
        calls.append(n)
        return n <= 37

    assert settings.largest_that_fits(fits, 512) == 37
    assert calls[:7] == [1, 2, 4, 8, 16, 32, 64] and len(calls) <= 7 + 6  # then bisecting 32..64
    assert settings.largest_that_fits(lambda n: True, 12) == 12  # never beyond the limit
    assert settings.largest_that_fits(lambda n: n <= 12, 12) == 12
    assert settings.largest_that_fits(lambda n: False, 64) == 0


@pytest.mark.parametrize("sequences, world_size, largest, expected", [
    (512, 1, 37, (32, 16)),  # 15M: 128 x 4 per iteration, 37 fit: 32 x 16
    (512, 2, 37, (32, 16)),  # 2 processes: 8 micro-steps each
    (96, 4, 10, (8, 12)),  # 24 per process: 8 divides it, 10 and 9 do not
    (512, 1, 1000, (512, 1)),  # more fits than needed: one micro-step
    (12, 1, 5, (4, 3)),
])
def test_split_batch_keeps_the_sequences_per_iteration(sequences, world_size, largest, expected):
    batch, accum = settings.split_batch(sequences, world_size, largest)
    assert (batch, accum) == expected
    assert batch * accum == sequences and accum % world_size == 0 and batch <= largest


MEASURE = """
import torch
from llamatiny import settings
from model import ModelArgs, Transformer

def status(field):  # kB, from Linux's /proc
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

args = ModelArgs(dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=4096, max_seq_len=128)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak so far (imports) is forgotten: VmHWM restarts from the current VmRSS
base = status("VmRSS")
model = Transformer(args)
optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
x = torch.randint(4096, (24, 129))
for _ in range(2):
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print(status("VmHWM") - base, settings.step_bytes(args, 24, "float32", "cpu"))
"""


def test_the_estimate_is_close_to_what_a_step_takes():
    # measured in a process of its own: the peak resident memory a real step adds
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("measures the peak resident memory through Linux's /proc")
    measured, estimate = map(int, subprocess.run([sys.executable, "-c", MEASURE], cwd=ROOT, check=True,
                                                 capture_output=True, text=True).stdout.split())
    assert 0.7 * measured < estimate < 1.1 * measured, (measured, estimate)


def test_the_estimate_grows_with_what_drives_memory():
    args = ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=32000, max_seq_len=256)
    one = settings.step_bytes(args, 64, "float32", "cpu")
    two = settings.step_bytes(args, 128, "float32", "cpu")
    weights = 16 * args.num_params()
    assert two - weights == pytest.approx(2 * (one - weights))  # activations and logits: linear in the batch
    assert settings.step_bytes(args, 64, "bfloat16", "cuda") < one  # the logits' gradients in half precision
    dropout = ModelArgs(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, max_seq_len=512,
                        dropout=0.05)
    plain = ModelArgs(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, max_seq_len=512)
    assert (settings.step_bytes(dropout, 32, "float32", "cpu")
            > 3 * settings.step_bytes(plain, 32, "float32", "cpu"))
    assert (settings.step_bytes(dropout, 32, "float32", "cuda")
            == settings.step_bytes(plain, 32, "float32", "cuda"))


def test_frozen_weights_need_no_gradients_or_optimizer_state():
    args = ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=32000, max_seq_len=256)
    full = settings.step_bytes(args, 16, "float32", "cpu")
    lora = settings.step_bytes(args, 16, "float32", "cpu", frozen=True)
    assert lora < full
