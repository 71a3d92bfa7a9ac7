"""pid_alive: running processes are alive; exited ones, zombies included, are not."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from dataflow.contracts.processes import pid_alive


def test_this_process_is_alive() -> None:
    assert pid_alive(os.getpid())


def test_a_reaped_child_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid)


def test_a_zombie_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while pid_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)  # exited but not reaped yet: a zombie
    assert not pid_alive(child.pid)
    child.wait()


def test_non_positive_pids_are_never_alive() -> None:
    # os.kill(0, 0) and os.kill(-1, 0) signal process groups: never read them as one process.
    assert not pid_alive(0)
    assert not pid_alive(-1)
