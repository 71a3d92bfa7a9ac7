"""Auditing an exactly-once run: the consumer's append-only log against the ledger's record."""

from __future__ import annotations

import json
from pathlib import Path

from dataflow.contracts import LedgerStatus
from dataflow.control.ledger import open_ledger


def replay(log: Path) -> dict[int, list[str]]:
    """The steps that count: a ``resume C`` line undoes every step after C."""
    steps: dict[int, list[str]] = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "resume" in record:
            steps = {s: ids for s, ids in steps.items() if s <= record["resume"]}
        else:
            assert record["step"] not in steps, f"step {record['step']} logged twice"
            steps[record["step"]] = record["ids"]
    return steps


def audit(uri: str, run_dir: Path, committed: list[str], quantum: int) -> LedgerStatus:
    """Assert exactly-once by the consumer's log and by the ledger; return the final status."""
    steps = replay(run_dir / "trained.log")
    assert sorted(steps) == list(range(len(steps))), "steps are not contiguous from 0"
    trained = [sid for s in sorted(steps) for sid in steps[s]]
    assert all(len(ids) == quantum for ids in steps.values())
    assert len(trained) == len(set(trained)), "a sample was trained twice"
    dropped = set(committed) - set(trained)
    assert set(trained) <= set(committed)
    assert len(dropped) < quantum
    ledger = open_ledger(uri)
    status = ledger.status()
    ledger.close()
    samples = dict(status.samples)
    assert samples == {
        "committed": 0,
        "assigned": 0,
        "trained": 0,
        "released": len(trained),
        "dropped": len(dropped),
    }
    assert dict(status.dropped_reasons) == ({"partial_window": len(dropped)} if dropped else {})
    assert status.in_flight_bytes == 0
    assert status.markers.consumer == "done"
    leaked = sorted(p.name for p in (run_dir / "features").iterdir())
    assert leaked == [], f"features never freed: {leaked}"
    return status
