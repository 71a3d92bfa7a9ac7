"""The gate's summary table: every comparison a test makes is recorded and printed at the end."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from equivalence_support import run_topology


@dataclass(frozen=True)
class Row:
    """One compared path: what was compared, over how many steps, the largest loss gap."""

    path: str
    steps: int
    max_delta: float
    tolerance: float
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.tolerance == 0.0:
            return "bit-identical" if self.max_delta == 0.0 else "DIFFERS"
        return f"within {self.tolerance:g}" if self.max_delta <= self.tolerance else "OUT OF TOL"


_ROWS: list[Row] = []


@pytest.fixture
def record():
    """``record(path, steps, max_delta, tolerance, note)`` adds a row to the summary table."""

    def add(path: str, steps: int, delta: float, tolerance: float, note: str = "") -> None:
        _ROWS.append(Row(path, steps, delta, tolerance, note))

    return add


def pytest_terminal_summary(terminalreporter) -> None:
    if not _ROWS:
        return
    tr = terminalreporter
    tr.section("equivalence summary")
    width = max(len(r.path) for r in _ROWS)
    tr.write_line(f"{'path':<{width}}  steps  {'max |dloss|':>11}  verdict")
    for r in _ROWS:
        note = f"  ({r.note})" if r.note else ""
        tr.write_line(f"{r.path:<{width}}  {r.steps:>5}  {r.max_delta:>11.3g}  {r.verdict}{note}")


@pytest.fixture(scope="session")
def offline_reference(tmp_path_factory) -> Path:
    """The reference run: colocated offline on one rank, features captured into ``file://``
    (``<run>/features``, which the multi-rank runs train from too).
    """
    out = tmp_path_factory.mktemp("colocated-offline")
    run_topology("colocated_offline", out, f"store.uri=file://{out}/features")
    return out
