"""Fixtures every test folder may use."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny torch models train fastest on one thread (and leave the shared cores to others); restored after."""
    import torch  # here, not at the top: the Keras tests load this file too

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread_seeded(one_thread) -> None:
    """:func:`one_thread`, and torch's generator seeded with 0: every program starts from the same weights."""
    import torch

    torch.manual_seed(0)


@pytest.fixture
def keras_seeded() -> None:
    """Keras' generators (and its backend's) seeded with 0: every program starts from the same weights. (The
    test module has chosen the backend before this imports Keras.)"""
    import keras

    keras.utils.set_random_seed(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_ranks() -> Callable[..., list[subprocess.CompletedProcess]]:
    """``two_ranks(script, out, timeout)``: run ``script out`` as 2 ranks of one gloo job, started as
    ``torchrun`` starts them (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``), each in its
    own session; past the deadline both are killed by process group and the test fails with their stderr
    tails (never a hung rank left behind)."""

    def launch(script: Path, out: Path, timeout: float) -> list[subprocess.CompletedProcess]:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "0"}
        procs = [subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=out, start_new_session=True,
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
        deadline, done = time.monotonic() + timeout, []
        try:
            for p in procs:
                stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
        except subprocess.TimeoutExpired:
            tails = []
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                tails.append((p.communicate()[1] or "")[-1500:])
            pytest.fail(f"the 2-rank run did not finish within {timeout:.0f} s (a hang?):\n" + "\n".join(tails))
        for rank, proc in enumerate(done):
            assert proc.returncode == 0, f"rank {rank}: {proc.stderr[-3000:]}"
        return done

    return launch


@pytest.fixture
def launched() -> Callable[..., subprocess.CompletedProcess]:
    """``launched(script, out, timeout, *args, check=True)``: run ``script out *args`` as one process that starts its own ranks
    (Lightning's launcher), in a new session: past the deadline the whole session is killed, every rank
    with it, and the test fails with its stderr tail."""

    def launch(script: Path, out: Path, timeout: float, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        p = subprocess.Popen([sys.executable, str(script), str(out), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=out, start_new_session=True, env=env)
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"the launch did not finish within {timeout:.0f} s (a hang?):\n{(p.communicate()[1] or '')[-3000:]}")
        assert p.returncode == 0 or not check, stderr[-3000:]
        return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)

    return launch
