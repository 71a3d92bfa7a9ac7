"""The vLLM keeper sweeps the ``/dev/shm`` segments its server tree left (no vLLM needed).

A stand-in server (a plain Python tree that creates, maps and holds segments the way torch and
multiprocessing do, and never unlinks them) is run under the real keeper and killed; what it
created must be gone afterwards, and a segment it never touched, or one another live process
still holds, must stay.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from dataflow.launch.engines.vllm_keeper import RECORD_ENV, SHM_SCAN_S, sweep_recorded

SHM = Path("/dev/shm")

STAND_IN = textwrap.dedent(
    """
    import mmap, os, sys, time
    def hold(name):
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, 4096)
        return mmap.mmap(fd, 4096), fd
    kept = [hold(sys.argv[1])]
    if os.fork() == 0:  # an engine process of the tree
        kept.append(hold(sys.argv[2]))
        open(f"/dev/shm/{sys.argv[2]}.ready", "w").close()
        time.sleep(600)
    open(f"/dev/shm/{sys.argv[1]}.ready", "w").close()
    time.sleep(600)
    """
)


def _names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:10]
    return f"psm_dftest{tag}", f"sem.mp-dftest{tag}"


def _start(names: tuple[str, str], record: Path) -> subprocess.Popen[bytes]:
    keeper = [sys.executable, "-m", "dataflow.launch.engines.vllm_keeper", str(os.getpid())]
    return subprocess.Popen(
        [*keeper, "--", sys.executable, "-c", STAND_IN, *names],
        start_new_session=True,
        env={**os.environ, RECORD_ENV: str(record)},
    )


def _wait_ready(names: tuple[str, str]) -> None:
    deadline = time.monotonic() + 30
    while not all((SHM / f"{n}.ready").exists() for n in names):
        assert time.monotonic() < deadline, "the stand-in server never created its segments"
        time.sleep(0.05)
    for n in names:
        (SHM / f"{n}.ready").unlink()
    time.sleep(SHM_SCAN_S * 2.5)  # the keeper has scanned the tree at least once since


def _cleanup(*names: str) -> None:
    for n in names:
        for path in (SHM / n, SHM / f"{n}.ready"):
            path.unlink(missing_ok=True)


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "shm-record"


def test_keeper_sweeps_the_segments_its_killed_tree_left(record: Path) -> None:
    names = _names()
    bystander = SHM / f"psm_dftest{uuid.uuid4().hex[:10]}"
    bystander.write_bytes(b"x")  # another program's segment, never touched by the tree
    keeper = _start(names, record)
    try:
        _wait_ready(names)
        assert all((SHM / n).exists() for n in names)
        keeper.send_signal(signal.SIGTERM)  # the producer stops its server
        keeper.wait(timeout=60)
        left = [n for n in names if (SHM / n).exists()]
        assert left == [], f"the keeper left {left} in /dev/shm"
        assert bystander.exists(), "the keeper removed a segment its tree never used"
    finally:
        keeper.kill()
        _cleanup(*names, bystander.name)


def test_segments_still_held_by_a_live_process_stay(record: Path) -> None:
    names = _names()
    keeper = _start(names, record)
    held = None
    try:
        _wait_ready(names)
        held = os.open(SHM / names[0], os.O_RDONLY)  # e.g. a consumer still mapping it
        keeper.send_signal(signal.SIGTERM)
        keeper.wait(timeout=60)
        assert (SHM / names[0]).exists(), "a segment a live process holds was unlinked"
        assert not (SHM / names[1]).exists()
    finally:
        if held is not None:
            os.close(held)
        keeper.kill()
        _cleanup(*names)


def test_a_keeper_killed_with_its_group_leaves_a_record_to_sweep(record: Path) -> None:
    names = _names()
    keeper = _start(names, record)
    try:
        _wait_ready(names)
        os.killpg(keeper.pid, signal.SIGKILL)  # keeper and server tree at once: nobody sweeps
        keeper.wait(timeout=60)
        time.sleep(0.5)  # the forked member is reaped by init
        assert all((SHM / n).exists() for n in names), "precondition: the tree left its segments"
        assert sorted(sweep_recorded(str(record))) == sorted(names)
        assert not any((SHM / n).exists() for n in names)
    finally:
        _cleanup(*names)
