"""Several processes, on CPU with gloo, as torchrun runs them: a rank killed mid-run and restarted by
torchrun, and two "nodes" on one machine. Each run's losses must equal a single uninterrupted process's."""
import os
import socket
import subprocess
import sys

import pytest
from conftest import ROOT
from test_train import TINY, assert_same_losses, ok, run_train

pytestmark = pytest.mark.slow
ARGS = ["--max_iters=12", "--eval_interval=4", "--gradient_accumulation_steps=4", "--batch_size=4",
        "--init_from=auto"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*launcher_args, script_args, env=None, cwd) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher_args, *script_args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


def finished(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_torchrun_restarts_a_killed_rank_and_the_run_continues_exactly(data_dir, tmp_path):
    reference = tmp_path / "reference"
    args = ARGS + ["--dropout=0.1"]  # each rank's random streams must continue too
    ok(run_train(args, data_dir, reference, torchrun=2))
    out = tmp_path / "out"
    marker = tmp_path / "killed"
    # rank 1 dies as it fetches its 11th batch: in iteration 5, after the checkpoint at iteration 4 (2
    # micro-batches per rank per iteration, fetched an iteration ahead: iteration i fetches 2i + 1 and 2i + 2)
    script = [str(ROOT / "tests" / "kill_rank.py"), str(ROOT / "train.py"), *TINY, *args,
              f"--data_dir={data_dir}", f"--out_dir={out}"]
    result = finished(torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=3", script_args=script,
                               env={"KILL_RANK": "1", "KILL_AT": "10", "MARKER": str(marker)}, cwd=tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert marker.exists() and "resuming from iteration 4" in result.stdout
    assert_same_losses(out, reference)


def test_two_nodes_on_one_machine_match_one_process(data_dir, tmp_path):
    # the README's two-node command lines, on 127.0.0.1: 2 ranks x 2 micro-steps see what 1 process x 4 sees
    single = tmp_path / "single"
    ok(run_train(ARGS, data_dir, single))
    out, port = tmp_path / "out", free_port()
    script = [str(ROOT / "train.py"), *TINY, *ARGS, f"--data_dir={data_dir}", f"--out_dir={out}"]
    nodes = [torchrun("--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                      f"--master_port={port}", script_args=script, cwd=tmp_path) for rank in (0, 1)]
    results = [finished(node) for node in nodes]
    for r in results:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "2 process(es) x 2 accumulation step(s)" in results[0].stdout
    assert_same_losses(out, single, evals=False)
