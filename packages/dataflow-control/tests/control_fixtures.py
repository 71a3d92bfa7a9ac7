"""Shared helpers for the controller, queue, flow and staleness tests (not a test module)."""

from __future__ import annotations

import itertools
import threading

from dataflow_testing import factories

from dataflow.contracts import SampleRef

_names = itertools.count()


def memory_uri() -> str:
    """A fresh named memory:// ledger (reopening the URI reaches the same ledger)."""
    return f"memory://control-{next(_names)}"


def make_ref(
    i: int,
    *,
    nbytes: int = 100,
    draft: str | None = None,
    target: str = "target-a",
    task: str | None = None,
) -> SampleRef:
    return factories.make_ref(
        i, nbytes=nbytes, source_task_id=task, target_version=target, draft_weight_version=draft
    )


def make_refs(start: int, count: int, **kw: object) -> list[SampleRef]:
    return [make_ref(i, **kw) for i in range(start, start + count)]  # type: ignore[arg-type]


class ResidentFeatures:
    """The feature side of a run, reduced to which sample ids hold features.

    ``put`` marks ids resident (what a store's put does); ``abort`` is the contracts'
    ``SampleAborter``: it frees an id (idempotent) and records (id, reason) so tests can assert
    every free and its reason. ``fail_on`` makes abort of those ids raise (a store fault).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.resident: set[str] = set()
        self.aborted: list[tuple[str, str]] = []
        self.fail_on: set[str] = set()

    def put(self, refs: list[SampleRef]) -> None:
        with self.lock:
            self.resident.update(ref.sample_id for ref in refs)

    def abort(self, sample_id: str, reason: str) -> None:
        with self.lock:
            if sample_id in self.fail_on:
                raise RuntimeError(f"cannot free {sample_id}")
            self.resident.discard(sample_id)
            self.aborted.append((sample_id, reason))

    def reasons(self) -> dict[str, str]:
        with self.lock:
            return dict(self.aborted)
