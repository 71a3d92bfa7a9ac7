"""``noop://``: a ledger that retains nothing, for colocated runs that need no durable record.

It validates every input exactly like the real ledgers (so a bug is caught in any mode), then
forgets it: every commit and prompt is reported fresh (there is nothing to deduplicate
against), no window is ever assigned, nothing is found, and ``status()`` says
``backend="noop", durable=False`` with zero counts, so nobody mistakes it for a record.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from dataflow.contracts.errors import ClosedError, NotFoundError
from dataflow.contracts.features import SampleRef
from dataflow.contracts.ids import validate_id, validate_task_id
from dataflow.contracts.lease import ConsumerLease
from dataflow.contracts.prompt import PromptTask
from dataflow.contracts.states import (
    CommitResult,
    ConsumerState,
    LedgerStatus,
    ProducerState,
    PromptState,
    ReconcileResult,
    RunMarkers,
    SampleState,
    Window,
)
from dataflow.contracts.weights import WeightVersion
from dataflow.control.ledger._rules import (
    check_drift,
    check_ids,
    check_int,
    check_lease,
    check_reason,
    check_refs,
    check_state,
    check_target_version,
    check_tasks,
    check_weight,
)


class NoopLedger:
    """Validates, then retains nothing; ``durable`` is False and ``status()`` reports zeros."""

    def __init__(self, uri: str = "noop://") -> None:
        self._uri = uri
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this noop:// ledger is closed")

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def durable(self) -> bool:
        return False

    def open_run(self, run_id: str, quantum: int, *, resume: bool) -> RunMarkers:
        self._check_open()
        validate_id(run_id, "run id")
        check_int(quantum, "quantum", 0)
        return RunMarkers()

    def markers(self) -> RunMarkers:
        self._check_open()
        return RunMarkers()

    def set_producer_state(self, state: ProducerState, reason: str = "") -> None:
        self._check_open()
        check_state(ProducerState, state)
        check_reason(reason, required=False)

    def set_consumer_state(self, state: ConsumerState, reason: str = "") -> None:
        self._check_open()
        check_state(ConsumerState, state)
        check_reason(reason, required=False)

    def set_durable_step(self, step: int) -> None:
        self._check_open()
        check_int(step, "step", 0)

    def add_prompts(self, tasks: Sequence[PromptTask]) -> CommitResult:
        self._check_open()
        return CommitResult(committed=tuple(t.task_id for t in check_tasks(tasks)))

    def lease_prompts(self, worker: str, limit: int, lease_s: float) -> list[PromptTask]:
        self._check_open()
        validate_id(worker, "worker id")
        check_lease(limit, lease_s)
        return []

    def complete_prompt(self, task_id: str, worker: str) -> PromptState:
        self._check_open()
        validate_task_id(task_id)
        validate_id(worker, "worker id")
        return PromptState.DONE

    def fail_prompt(
        self, task_id: str, worker: str, reason: str, *, retryable: bool
    ) -> PromptState:
        self._check_open()
        validate_task_id(task_id)
        validate_id(worker, "worker id")
        check_reason(reason)
        return PromptState.FAILED

    def reclaim_leases(self, worker: str) -> list[str]:
        self._check_open()
        validate_id(worker, "worker id")
        return []

    def commit(self, refs: Sequence[SampleRef]) -> CommitResult:
        self._check_open()
        return CommitResult(committed=tuple(r.sample_id for r in check_refs(refs)))

    def assign_window(self, dp_size: int, per_rank: int) -> Window | None:
        self._check_open()
        check_int(dp_size, "dp_size", 1)
        check_int(per_rank, "per_rank", 1)
        return None

    def assigned(self, rank: int, after_window: int = -1) -> list[SampleRef]:
        self._check_open()
        check_int(rank, "rank", 0)
        return []

    def committed(self, limit: int) -> list[SampleRef]:
        self._check_open()
        check_int(limit, "limit", 0)
        return []

    def trained_through(self, step: int) -> list[SampleRef]:
        self._check_open()
        check_int(step, "step", -1)
        return []

    def refs(self, sample_ids: Sequence[str]) -> list[SampleRef]:
        self._check_open()
        ids = check_ids(sample_ids)
        if ids:
            raise NotFoundError(f"a noop:// ledger retains nothing; unknown sample id {ids[0]!r}")
        return []

    def ack(self, step: int, sample_ids: Sequence[str], *, epoch: int | None = None) -> None:
        self._check_open()
        check_int(step, "step", 0)
        check_ids(sample_ids)

    # A noop:// ledger is private to one process: its lease is always granted, never fenced.
    def consumer_lease(self) -> ConsumerLease:
        self._check_open()
        return ConsumerLease()

    def acquire_consumer_lease(
        self, host: str, pid: int, lease_s: float, *, takeover: bool = False
    ) -> ConsumerLease:
        self._check_open()
        now = time.time()
        return ConsumerLease(1, host, pid, now, now + lease_s)

    def renew_consumer_lease(self, epoch: int, lease_s: float) -> ConsumerLease:
        self._check_open()
        now = time.time()
        return ConsumerLease(epoch, "", 0, now, now + lease_s)

    def release_consumer_lease(self, epoch: int) -> None:
        self._check_open()

    def drop(self, sample_ids: Sequence[str], reason: str) -> list[SampleRef]:
        self._check_open()
        check_ids(sample_ids)
        check_reason(reason)
        return []

    def drop_partial_tail(self) -> list[SampleRef]:
        self._check_open()
        return []

    def release_through(self, step: int) -> list[SampleRef]:
        self._check_open()
        check_int(step, "step", 0)
        return []

    def reconcile(self, checkpoint_step: int, dp_size: int) -> ReconcileResult:
        self._check_open()
        check_int(checkpoint_step, "checkpoint_step", -1)
        check_int(dp_size, "dp_size", 1)
        return ReconcileResult(checkpoint_step=checkpoint_step)

    def declare_target(self, version: str) -> None:
        self._check_open()
        check_target_version(version)

    def record_drift(self, mean_lag: float, max_lag: int) -> None:
        self._check_open()
        check_drift(mean_lag, max_lag)

    def publish_weight(self, version: WeightVersion) -> WeightVersion:
        self._check_open()
        return dataclasses.replace(check_weight(version), publish_order=0)

    def weight_versions(self) -> list[WeightVersion]:
        self._check_open()
        return []

    def status(self) -> LedgerStatus:
        self._check_open()
        return LedgerStatus(
            backend="noop",
            durable=False,
            markers=RunMarkers(),
            samples={s.value: 0 for s in SampleState},
            prompts={p.value: 0 for p in PromptState},
        )

    def close(self) -> None:
        self._closed = True
