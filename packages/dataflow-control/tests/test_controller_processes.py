"""Producer and consumer as real processes sharing one ledger (a SQLite file, a real Redis)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from exactly_once_audit import audit
from spawned import Spawned

from dataflow.contracts import NotFoundError
from dataflow.control.ledger import open_ledger

RUN_ID = "run-eo"  # the run id the audit helper expects


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest) -> str:
    """Where the shared ledger lives: a SQLite file, or a real redis-server."""
    return str(request.param)


def fresh_ledger(run_dir: Path, quantum: int, backend: str, request: pytest.FixtureRequest) -> str:
    if backend == "redis":
        server = request.getfixturevalue("redis_server")
        uri = server.url(0, namespace=f"procs-{run_dir.name}")
    else:
        uri = f"sqlite:///{run_dir / 'ledger.db'}"
    (run_dir / "features").mkdir()
    ledger = open_ledger(uri)
    ledger.open_run(RUN_ID, quantum, resume=False)
    ledger.close()
    return uri


def consumer(uri: str, run_dir: Path, dp: int, batch: int, *extra: str) -> Spawned:
    args = [uri, str(run_dir), RUN_ID, str(dp), str(batch), *extra]
    return Spawned("exactly_once_consumer.py", args, run_dir)


def producer(uri: str, run_dir: Path, prompts: int, *extra: str) -> Spawned:
    args = [uri, str(run_dir), RUN_ID, "worker-0", str(prompts), *extra]
    return Spawned("producer_process.py", args, run_dir)


def rollouts(run_dir: Path) -> list[list[str]]:
    """The rollout log split per producer attempt."""
    attempts: list[list[str]] = []
    for line in (run_dir / "rollouts.log").read_text(encoding="utf-8").splitlines():
        if line.startswith("start "):
            attempts.append([])
        else:
            attempts[-1].append(line)
    return attempts


def test_producer_failure_reaches_the_consumer_process_as_an_error(tmp_path, backend, request):
    uri = fresh_ledger(tmp_path, 2, backend, request)
    cons = consumer(uri, tmp_path, 1, 2)
    prod = producer(uri, tmp_path, 10, "--fail-after", "3")
    assert prod.wait(timeout=60) == 3, prod.errors()
    assert cons.wait(timeout=60) == 1, cons.errors()  # an error exit, never a clean end
    assert "RunFailedError: the producer failed (injected failure after 3 commits)" in (
        cons.errors()
    )
    ledger = open_ledger(uri)
    status = ledger.status()
    ledger.close()
    assert status.markers.producer == "failed"
    assert status.markers.consumer != "done"


def test_a_restarted_producer_continues_and_the_consumer_trains_everything_once(
    tmp_path, backend, request
):
    uri = fresh_ledger(tmp_path, 2, backend, request)
    cons = consumer(uri, tmp_path, 2, 1)
    first = producer(uri, tmp_path, 12)
    log = tmp_path / "rollouts.log"
    while not log.exists() or len(log.read_text().splitlines()) < 6:
        assert first.poll() is None, "the producer finished before it could be killed"
        time.sleep(0.005)
    first.kill()
    ledger = open_ledger(uri)
    finished = set()
    for i in range(12):
        try:
            ledger.refs([f"s{i:05d}"])
            finished.add(f"p{i}")
        except NotFoundError:
            pass
    ledger.close()
    assert finished, "nothing was committed before the kill"
    second = producer(uri, tmp_path, 12)
    assert second.wait(timeout=60) == 0, second.errors()
    assert cons.wait(timeout=60) == 0, cons.errors()
    before, after = rollouts(tmp_path)
    assert not finished & set(after), "a finished prompt was rolled out again"
    assert set(before) | set(after) == {f"p{i}" for i in range(12)}
    status = audit(uri, tmp_path, [f"s{i:05d}" for i in range(12)], 2)
    assert status.samples["released"] == 12
    assert dict(status.prompts) == {"pending": 0, "leased": 0, "done": 12, "failed": 0}


def test_a_consumer_killed_while_the_producer_runs_resumes_and_trains_everything_once(
    tmp_path, backend, request
):
    uri = fresh_ledger(tmp_path, 2, backend, request)
    prod = producer(uri, tmp_path, 16)
    cons = consumer(uri, tmp_path, 2, 1)
    while not (tmp_path / "ckpt.json").exists():
        assert cons.poll() is None, cons.errors()
        time.sleep(0.002)
    cons.kill()
    resumed = consumer(uri, tmp_path, 1, 2)  # another dp_size, same quantum
    assert prod.wait(timeout=60) == 0, prod.errors()
    assert resumed.wait(timeout=60) == 0, resumed.errors()
    status = audit(uri, tmp_path, [f"s{i:05d}" for i in range(16)], 2)
    assert status.samples["released"] == 16 and status.markers.dp_size == 1


def test_flow_control_keeps_a_fast_producer_under_the_byte_cap(tmp_path, backend, request):
    uri = fresh_ledger(tmp_path, 2, backend, request)
    limits = ["--high-refs", "8", "--max-bytes", "500", "--rollout-s", "0.001"]
    prod = producer(uri, tmp_path, 24, *limits)
    cons = consumer(uri, tmp_path, 1, 2, "2", "0.03")  # a slow trainer
    ledger = open_ledger(uri)
    peak = 0
    while prod.poll() is None or cons.poll() is None:
        peak = max(peak, ledger.status().in_flight_bytes)
        time.sleep(0.003)
    ledger.close()
    assert prod.wait(timeout=1) == 0, prod.errors()
    assert cons.wait(timeout=1) == 0, cons.errors()
    assert 0 < peak <= 500
    flow = json.loads((tmp_path / "flow.json").read_text())
    assert flow["pauses"] >= 1 and flow["paused_s"] > 0
    assert flow["reserved_bytes"] == 0
    audit(uri, tmp_path, [f"s{i:05d}" for i in range(24)], 2)
