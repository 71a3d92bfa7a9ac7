"""The SQLite ledger's disk fills up: a clear error, no hang, no corruption.

The ledger lives on a small tmpfs mounted for the test (needs root and mount(2); skipped with
the exact reason otherwise). Refs are committed until the disk is full: the failing call must
raise `CapacityExceededError` naming the full disk, within a bounded time, with nothing of the
failed commit applied. Then the tmpfs is enlarged: the same ledger object takes commits again
(no transaction left open by the failed one), and after a reopen its status holds exactly the
acknowledged commits (none half-written, none lost).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dataflow.contracts import CapacityExceededError, SampleRef
from dataflow.control import open_ledger
from dataflow.store import open_store

FILL_TIMEOUT_S = 120.0


def _mount(point: Path, size: str) -> str:
    """Mount a tmpfs of ``size`` at ``point``; '' on success, else why it cannot be done."""
    if os.geteuid() != 0:
        return f"mounting a tmpfs needs root (euid {os.geteuid()})"
    if shutil.which("mount") is None:
        return "no mount binary on PATH"
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
        capture_output=True,
        text=True,
        check=False,
    )
    return "" if result.returncode == 0 else f"mount -t tmpfs failed: {result.stderr.strip()}"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    point = tmp_path / "disk"
    point.mkdir()
    why = _mount(point, "256k")
    if why:
        pytest.skip(f"cannot fill a ledger disk here: {why}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)


def _refs(start: int, count: int) -> list[SampleRef]:
    store = open_store("memory://")
    features = {"input_ids": torch.zeros(1, 4, dtype=torch.int64)}
    refs = [store.put(f"s-{i}", features, {"note": "x" * 200}) for i in range(start, start + count)]
    store.close()
    return refs


def test_full_ledger_disk_is_a_clear_error_and_the_ledger_survives(small_disk, summary):
    uri = f"sqlite://{small_disk / 'ledger.sqlite'}"
    ledger = open_ledger(uri)
    ledger.open_run("gate-disk", 2, resume=False)
    acknowledged: list[str] = []
    outcome: dict[str, BaseException] = {}

    def fill() -> None:
        try:
            for batch in range(10_000):
                refs = _refs(batch * 8, 8)
                ledger.commit(refs)
                acknowledged.extend(r.sample_id for r in refs)
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=fill, name="fill-ledger", daemon=True)
    worker.start()
    worker.join(FILL_TIMEOUT_S)
    assert not worker.is_alive(), f"commit hung on a full disk ({len(acknowledged)} committed)"
    error = outcome.get("error")
    assert error is not None, "the disk never filled"
    assert isinstance(error, CapacityExceededError), f"{type(error).__name__}: {error}"
    message = str(error).lower()
    assert "disk holding the ledger is full" in message and str(small_disk) in str(error), message
    assert ledger.status().samples["committed"] == len(acknowledged)  # nothing half-applied

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    after = _refs(10**6, 2)  # the same object goes on once there is room again
    assert ledger.commit(after).committed == tuple(r.sample_id for r in after)
    acknowledged.extend(r.sample_id for r in after)
    ledger.close()

    reopened = open_ledger(uri)
    try:
        status = reopened.status()
        assert status.samples["committed"] == len(acknowledged), (status.samples, len(acknowledged))
        known = {r.sample_id for r in reopened.refs(acknowledged)}
        assert known == set(acknowledged)
        reopened.open_run("gate-disk", 2, resume=True)
        more = _refs(2 * 10**6, 2)
        assert reopened.commit(more).committed == tuple(r.sample_id for r in more)
        assert reopened.status().samples["committed"] == len(acknowledged) + 2
    finally:
        reopened.close()
    summary.append(
        f"faults/ledger-disk-full: {len(acknowledged) - 2} refs committed on a 256 KiB tmpfs, then "
        f"{type(error).__name__}: {str(error)[:120]}; after enlarging, the same ledger and a "
        "reopened one hold exactly those refs and take more"
    )
