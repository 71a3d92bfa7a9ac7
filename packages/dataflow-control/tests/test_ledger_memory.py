"""The ledger conformance suite on ``memory://`` (named, so reopening reaches the same ledger)."""

from __future__ import annotations

import itertools

import pytest
from ledger_conformance import LedgerConformance

from dataflow.control.ledger import open_ledger

_names = itertools.count()


class TestMemoryLedger(LedgerConformance):
    @pytest.fixture
    def uri(self) -> str:
        return f"memory://conformance-{next(_names)}"


def test_unnamed_memory_ledgers_are_private() -> None:
    first, second = open_ledger("memory://"), open_ledger("memory://")
    first.open_run("run-1", 4, resume=False)
    assert second.markers().run_id == ""
    assert first.durable is False
