"""The trainer borrows the server's core only while the server is idle (trainer/threads.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from trainer.threads import CoreBorrower, core_borrower, process_cpu_seconds

pytestmark = pytest.mark.skipif(process_cpu_seconds(os.getpid()) is None, reason="reads /proc/<pid>/stat (Linux)")


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def server(busy: bool) -> subprocess.Popen:
    """A stand-in server: one that spins a core (users chatting), or one that waits (nobody chatting)."""
    code = "while True: pass" if busy else "import time; time.sleep(60)"
    return subprocess.Popen([sys.executable, "-c", code])


@pytest.mark.parametrize("busy", [False, True])
def test_the_trainer_takes_the_servers_core_only_while_it_is_idle(busy, keep_threads):
    process = server(busy)
    try:
        borrower = CoreBorrower(process.pid, own_threads=1, idle_threads=2, min_interval_s=0.3)
        assert borrower() == 1                                  # serving first, until a look says it is idle
        chosen = []
        for _ in range(3):
            time.sleep(0.4)
            chosen.append(borrower())
        assert chosen == ([1, 1, 1] if busy else [2, 2, 2])
        assert torch.get_num_threads() == chosen[-1]
        assert borrower.borrowed_share == (0.0 if busy else 0.75)
    finally:
        process.kill()
        process.wait()


def test_a_server_that_is_gone_gets_its_core_back_and_no_server_means_no_borrowing(monkeypatch, keep_threads):
    process = server(False)
    borrower = CoreBorrower(process.pid, own_threads=1, idle_threads=2, min_interval_s=0.1)
    time.sleep(0.2)
    assert borrower() == 2
    process.kill()
    process.wait()
    assert borrower() == 1                                      # nothing to read: keep to our own share
    monkeypatch.delenv("RLHF_SERVER_PID", raising=False)
    assert core_borrower(1, 0) is None                          # `run.py retrain` by hand: threads as configured
    monkeypatch.setenv("RLHF_SERVER_PID", str(process.pid))
    assert core_borrower(1, 1) is None                          # idle_threads = own: borrowing off
