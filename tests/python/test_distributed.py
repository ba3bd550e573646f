"""Sequence parallelism over gloo (pnewton.distributed): 2 and 4 processes on localhost,
each case compared with the single-process solve (tests/python/distributed_cases.py)."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_cases

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"{p}ranks")
def ranks(request, tmp_path_factory):
    """Every case's outcome on every rank of one spawned group."""
    world = request.param
    out = tmp_path_factory.mktemp(f"ranks{world}")
    mp.spawn(distributed_cases.run, (world, free_port(), str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("case", sorted(distributed_cases.CASES))
def test_sharded_solve_matches_one_process(ranks, case):
    failures = [f"rank {r}:\n{res[case]}" for r, res in enumerate(ranks) if res[case] != "ok"]
    assert not failures, "\n".join(failures)


def test_the_example_trains_under_torchrun():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), os.path.join(root, "examples", "train_gru_distributed.py"),
                          "--T", "600", "--steps", "4"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "step    4" in run.stdout
    error = float(run.stdout.strip().splitlines()[-1].split()[-1])
    assert error < 1e-5, run.stdout  # float32 against torch.nn.GRU over the whole sequence
