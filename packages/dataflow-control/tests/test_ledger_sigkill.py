"""A process SIGKILLed in the middle of ledger transactions leaves no half-applied change.

After each kill the rows are counted directly in the store and compared with the counters that
``status()`` reports: they can only agree if every transition and its counters were one
transaction.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from dataflow_testing.redis import RedisServer

from dataflow.control.ledger import open_ledger

ROLES = Path(__file__).with_name("ledger_roles.py")
KILLS = 6
STATES = ("committed", "assigned", "trained", "released", "dropped")


def _run_and_kill(uri: str, seed: int, rng: random.Random) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(ROLES), "churn", uri, str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROLES.parent,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read() if proc.stderr else ""
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert proc.returncode == -signal.SIGKILL


def _open_run(uri: str) -> None:
    ledger = open_ledger(uri)
    ledger.open_run("shared-run", 4, resume=False)
    ledger.close()


def _status_counts(uri: str) -> tuple[dict[str, int], int]:
    ledger = open_ledger(uri)
    status = ledger.status()
    ledger.close()
    return dict(status.samples), status.in_flight_bytes


def _sqlite_rows(path: Path) -> tuple[dict[str, int], int]:
    conn = sqlite3.connect(path)
    by_code = dict(conn.execute("SELECT state, COUNT(*) FROM samples GROUP BY state").fetchall())
    nbytes = conn.execute("SELECT COALESCE(SUM(nbytes), 0) FROM samples WHERE state IN (0, 1)")
    total = nbytes.fetchone()[0]
    conn.close()
    return {name: by_code.get(code, 0) for code, name in enumerate(STATES)}, total


def _redis_rows(server: RedisServer, db: int, namespace: str) -> tuple[dict[str, int], int]:
    client = redis.Redis(port=server.port, db=db, decode_responses=True)
    rows = [json.loads(v) for v in client.hgetall(f"dataflow:{namespace}:samples").values()]
    counts = Counter(row[1] for row in rows)
    in_flight = sum(row[6] for row in rows if row[1] in ("committed", "assigned"))
    return {name: counts.get(name, 0) for name in STATES}, in_flight


def test_sqlite_counters_match_rows_after_sigkills(tmp_path: Path) -> None:
    path = tmp_path / "churn.db"
    uri = f"sqlite://{path}"
    _open_run(uri)
    rng = random.Random(5)
    for kill in range(KILLS):
        _run_and_kill(uri, kill, rng)
        assert _status_counts(uri) == _sqlite_rows(path), f"after kill {kill}"
    assert _sqlite_rows(path)[0]["released"] > 0  # the churn got through every state


@pytest.mark.redis
def test_redis_counters_match_rows_after_sigkills(redis_server: RedisServer) -> None:
    uri = redis_server.url(6, namespace="churn")
    _open_run(uri)
    rng = random.Random(6)
    for kill in range(KILLS):
        _run_and_kill(uri, kill, rng)
        assert _status_counts(uri) == _redis_rows(redis_server, 6, "churn"), f"after kill {kill}"
    assert _redis_rows(redis_server, 6, "churn")[0]["released"] > 0
