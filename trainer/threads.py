"""The trainer's thread budget: its own cores always, and the serving process's core while nobody is served.

On 2 cores the training subprocess gets 1 thread and serving the other, because oversubscribed threads made a
serving step 1.3-10x slower (DESIGN.md, Serving). But the server is idle most of a cycle (the votes come in
bursts), and a cycle's learning is bound by how many PPO updates fit in its minutes (issue 12). So before each
heavy step the trainer looks at how much CPU the server used since the last look (Linux `/proc/<pid>/stat`):
under `busy_cores` it is idle and the trainer runs `idle_threads`; otherwise it keeps to `own_threads`. A user who
starts chatting waits at most one step (a PPO minibatch, seconds) for the core to come back.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

SERVER_PID_ENV = "RLHF_SERVER_PID"   # set by the scheduler for the training subprocess it starts


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far; None where /proc cannot tell (gone, not Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()   # the name may hold spaces
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")          # utime, stime (fields 14, 15)


class CoreBorrower:
    """Call it before each heavy step: it sets torch's threads to `idle_threads` while the server used less than
    `busy_cores` cores since the last look, else to `own_threads`; returns the threads it chose."""

    def __init__(self, server_pid: int, own_threads: int, idle_threads: int, busy_cores: float = 0.2,
                 min_interval_s: float = 0.5):
        self.server_pid, self.own_threads, self.idle_threads = server_pid, own_threads, idle_threads
        self.busy_cores, self.min_interval_s = busy_cores, min_interval_s
        self.last_time, self.last_cpu = time.monotonic(), process_cpu_seconds(server_pid)
        self.server_busy = True                    # until the first look says otherwise: serving comes first
        self.borrowed_steps = self.steps = 0

    def __call__(self) -> int:
        now, cpu = time.monotonic(), process_cpu_seconds(self.server_pid)
        if cpu is None or self.last_cpu is None:   # no server to read: keep to our own share
            self.server_busy = True
            self.last_time, self.last_cpu = now, cpu
        elif now - self.last_time >= self.min_interval_s:   # a shorter window would read noise
            self.server_busy = (cpu - self.last_cpu) / (now - self.last_time) >= self.busy_cores
            self.last_time, self.last_cpu = now, cpu
        threads = self.own_threads if self.server_busy else self.idle_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self.steps += 1
        self.borrowed_steps += threads > self.own_threads
        return threads

    @property
    def borrowed_share(self) -> float:
        """Share of the steps that ran with the server's core too."""
        return self.borrowed_steps / self.steps if self.steps else 0.0


def core_borrower(own_threads: int, idle_threads: int) -> CoreBorrower | None:
    """The borrower for a training subprocess started by a server (its pid in RLHF_SERVER_PID), or None when there is
    no server to borrow from or nothing to borrow (`idle_threads` 0 means every core)."""
    pid = os.environ.get(SERVER_PID_ENV)
    idle_threads = idle_threads or os.cpu_count() or 1
    if not pid or not pid.isdigit() or idle_threads <= own_threads:
        return None
    return CoreBorrower(int(pid), own_threads, idle_threads)
