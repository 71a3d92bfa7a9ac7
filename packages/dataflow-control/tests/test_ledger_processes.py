"""Two real processes share one ledger: a producer commits while a consumer dispatches and acks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dataflow_testing.redis import RedisServer

from dataflow.contracts import ConsumerState, ProducerState
from dataflow.control.ledger import PARTIAL_WINDOW, open_ledger

ROLES = Path(__file__).with_name("ledger_roles.py")
COUNT, DP, PER_RANK = 203, 2, 4  # 25 whole windows of 8, a tail of 3


def run_pair(uri: str, seed: int) -> dict[str, list]:  # type: ignore[type-arg]
    ledger = open_ledger(uri)
    ledger.open_run("shared-run", DP * PER_RANK, resume=False)
    ledger.close()
    consumer = subprocess.Popen(
        [sys.executable, str(ROLES), "consumer", uri, str(DP), str(PER_RANK)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROLES.parent,
    )
    producer = subprocess.run(
        [sys.executable, str(ROLES), "producer", uri, str(COUNT), str(seed)],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROLES.parent,
    )
    out, err = consumer.communicate(timeout=90)
    assert producer.returncode == 0, producer.stderr
    assert consumer.returncode == 0, err
    summary: dict[str, list] = json.loads(out)  # type: ignore[type-arg]
    return summary


def check_exactly_once(uri: str, summary: dict[str, list]) -> None:  # type: ignore[type-arg]
    expected = [f"s{i:05d}" for i in range(COUNT)]
    trained = [sid for step in summary["trained"] for sid in step]
    assert len(trained) == len(set(trained)) == 200  # nobody trained twice
    assert trained + summary["tail"] == expected  # whole windows, in commit order, none lost
    assert all(len(step) == DP * PER_RANK for step in summary["trained"])
    ledger = open_ledger(uri)
    status = ledger.status()
    ledger.close()
    assert status.samples == {
        "committed": 0, "assigned": 0, "trained": 200, "released": 0, "dropped": 3
    }  # fmt: skip
    assert dict(status.dropped_reasons) == {PARTIAL_WINDOW: 3}
    assert status.in_flight == 0 and status.in_flight_bytes == 0
    assert status.markers.producer is ProducerState.CLOSED
    assert status.markers.consumer is ConsumerState.DONE
    assert status.markers.trained_step == 24


def test_two_processes_share_one_sqlite_ledger(tmp_path: Path) -> None:
    uri = f"sqlite://{tmp_path}/shared.db"
    check_exactly_once(uri, run_pair(uri, seed=7))


@pytest.mark.redis
def test_two_processes_share_one_redis_ledger(redis_server: RedisServer) -> None:
    uri = redis_server.url(4, namespace="two-processes")
    check_exactly_once(uri, run_pair(uri, seed=11))
