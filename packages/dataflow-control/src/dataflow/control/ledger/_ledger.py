"""``StorageLedger``: the Ledger protocol over any ``LedgerStorage`` backend.

Arguments are validated here, before a transaction starts; the rules run inside one
transaction each (``_samples``, ``_prompts``, ``_run``). Backends only store, so memory, SQLite
and Redis cannot disagree on what is allowed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from dataflow.contracts.errors import InvalidInputError
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
    Window,
)
from dataflow.contracts.weights import WeightVersion
from dataflow.control.ledger import _lease, _prompts, _run, _samples
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
from dataflow.control.ledger._tx import LedgerStorage, LedgerTx

DEFAULT_MAX_PROMPT_ATTEMPTS = 3
"""Total attempts a prompt gets (first try included) before it is FAILED."""


class StorageLedger:
    """A ledger whose every method is one atomic, validated transaction on its storage.

    ``max_prompt_attempts`` bounds the attempts of a prompt (expired or reclaimed leases and
    retryable failures each use one); ``clock`` gives wall-clock seconds for lease deadlines,
    which are compared across processes.
    """

    def __init__(
        self,
        storage: LedgerStorage,
        uri: str,
        *,
        max_prompt_attempts: int = DEFAULT_MAX_PROMPT_ATTEMPTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._storage = storage
        self._uri = uri
        self._max_attempts = check_int(max_prompt_attempts, "max_prompt_attempts", 1)
        self._clock = clock

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._uri!r})"

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def durable(self) -> bool:
        return self._storage.durable

    # -- run markers -----------------------------------------------------------------------
    def open_run(self, run_id: str, quantum: int, *, resume: bool) -> RunMarkers:
        validate_id(run_id, "run id")
        check_int(quantum, "quantum", 0)
        return self._storage.write(lambda tx: _run.open_run(tx, run_id, quantum, bool(resume)))

    def markers(self) -> RunMarkers:
        return self._storage.read(_run.markers)

    def set_producer_state(self, state: ProducerState, reason: str = "") -> None:
        target = check_state(ProducerState, state)
        check_reason(reason, required=False)
        self._storage.write(lambda tx: _run.set_producer_state(tx, target, reason))

    def set_consumer_state(self, state: ConsumerState, reason: str = "") -> None:
        target = check_state(ConsumerState, state)
        check_reason(reason, required=False)
        self._storage.write(lambda tx: _run.set_consumer_state(tx, target, reason))

    def set_durable_step(self, step: int) -> None:
        check_int(step, "step", 0)
        self._storage.write(lambda tx: _run.set_durable_step(tx, step))

    # -- prompts ---------------------------------------------------------------------------
    def add_prompts(self, tasks: Sequence[PromptTask]) -> CommitResult:
        checked = check_tasks(tasks)
        return self._storage.write(lambda tx: _prompts.add_prompts(tx, checked))

    def lease_prompts(self, worker: str, limit: int, lease_s: float) -> list[PromptTask]:
        validate_id(worker, "worker id")
        limit, lease_s = check_lease(limit, lease_s)
        now = self._clock()
        return self._storage.write(
            lambda tx: _prompts.lease_prompts(tx, worker, limit, lease_s, now, self._max_attempts)
        )

    def complete_prompt(self, task_id: str, worker: str) -> PromptState:
        validate_task_id(task_id)
        validate_id(worker, "worker id")
        return self._storage.write(lambda tx: _prompts.complete_prompt(tx, task_id, worker))

    def fail_prompt(
        self, task_id: str, worker: str, reason: str, *, retryable: bool
    ) -> PromptState:
        validate_task_id(task_id)
        validate_id(worker, "worker id")
        check_reason(reason)
        return self._storage.write(
            lambda tx: _prompts.fail_prompt(
                tx, task_id, worker, reason, bool(retryable), self._max_attempts
            )
        )

    def reclaim_leases(self, worker: str) -> list[str]:
        validate_id(worker, "worker id")
        return self._storage.write(
            lambda tx: _prompts.reclaim_leases(tx, worker, self._max_attempts)
        )

    # -- samples ---------------------------------------------------------------------------
    def commit(self, refs: Sequence[SampleRef]) -> CommitResult:
        checked = check_refs(refs)
        if not checked:
            return CommitResult()
        return self._storage.write(lambda tx: _samples.commit(tx, checked))

    def assign_window(self, dp_size: int, per_rank: int) -> Window | None:
        check_int(dp_size, "dp_size", 1)
        check_int(per_rank, "per_rank", 1)
        return self._storage.write(lambda tx: _samples.assign_window(tx, dp_size, per_rank))

    def assigned(self, rank: int, after_window: int = -1) -> list[SampleRef]:
        check_int(rank, "rank", 0)
        check_int(after_window, "after_window", -1)
        return self._storage.read(lambda tx: _samples.assigned(tx, rank, after_window))

    def committed(self, limit: int) -> list[SampleRef]:
        check_int(limit, "limit", 0)
        return self._storage.read(lambda tx: _samples.committed(tx, limit))

    def trained_through(self, step: int) -> list[SampleRef]:
        check_int(step, "step", -1)
        return self._storage.read(lambda tx: _samples.trained_through(tx, step))

    def refs(self, sample_ids: Sequence[str]) -> list[SampleRef]:
        ids = check_ids(sample_ids)
        return self._storage.read(lambda tx: _samples.refs(tx, ids))

    def ack(self, step: int, sample_ids: Sequence[str], *, epoch: int | None = None) -> None:
        check_int(step, "step", 0)
        ids = check_ids(sample_ids)
        if epoch is None:
            self._storage.write(lambda tx: _samples.ack(tx, step, ids))
            return
        check_int(epoch, "epoch", 1)

        def fenced(tx: LedgerTx) -> None:
            _lease.check_epoch(tx, epoch, self._clock(), f"ack of step {step}")
            _samples.ack(tx, step, ids)

        self._storage.write(fenced)

    # -- consumer lease ----------------------------------------------------------------------
    def consumer_lease(self) -> ConsumerLease:
        return self._storage.read(_lease.current)

    def acquire_consumer_lease(
        self, host: str, pid: int, lease_s: float, *, takeover: bool = False
    ) -> ConsumerLease:
        check_int(pid, "pid", 1)
        if not isinstance(host, str) or not host:
            raise InvalidInputError(f"host must be a non-empty str, got {host!r}")
        _check_lease_s(lease_s)
        return self._storage.write(
            lambda tx: _lease.acquire(tx, host, pid, self._clock(), float(lease_s), takeover)
        )

    def renew_consumer_lease(self, epoch: int, lease_s: float) -> ConsumerLease:
        check_int(epoch, "epoch", 1)
        _check_lease_s(lease_s)
        return self._storage.write(
            lambda tx: _lease.renew(tx, epoch, self._clock(), float(lease_s))
        )

    def release_consumer_lease(self, epoch: int) -> None:
        check_int(epoch, "epoch", 1)
        self._storage.write(lambda tx: _lease.release(tx, epoch))

    def drop(self, sample_ids: Sequence[str], reason: str) -> list[SampleRef]:
        ids = check_ids(sample_ids)
        check_reason(reason)
        if not ids:
            return []
        return self._storage.write(lambda tx: _samples.drop(tx, ids, reason))

    def drop_partial_tail(self) -> list[SampleRef]:
        return self._storage.write(_samples.drop_partial_tail)

    def release_through(self, step: int) -> list[SampleRef]:
        check_int(step, "step", 0)
        return self._storage.write(lambda tx: _samples.release_through(tx, step))

    def reconcile(self, checkpoint_step: int, dp_size: int) -> ReconcileResult:
        check_int(checkpoint_step, "checkpoint_step", -1)
        check_int(dp_size, "dp_size", 1)
        return self._storage.write(lambda tx: _samples.reconcile(tx, checkpoint_step, dp_size))

    # -- weights and status ----------------------------------------------------------------
    def declare_target(self, version: str) -> None:
        checked = check_target_version(version)
        self._storage.write(lambda tx: _run.declare_target(tx, checked))

    def record_drift(self, mean_lag: float, max_lag: int) -> None:
        mean, top = check_drift(mean_lag, max_lag)
        self._storage.write(lambda tx: _run.record_drift(tx, mean, top))

    def publish_weight(self, version: WeightVersion) -> WeightVersion:
        checked = check_weight(version)
        return self._storage.write(lambda tx: _run.publish_weight(tx, checked))

    def weight_versions(self) -> list[WeightVersion]:
        return self._storage.read(lambda tx: tx.weights())

    def status(self) -> LedgerStatus:
        return self._storage.read(
            lambda tx: _run.status(tx, self._storage.backend, self._storage.durable)
        )

    def close(self) -> None:
        self._storage.close()


def _check_lease_s(lease_s: object) -> None:
    if isinstance(lease_s, bool) or not isinstance(lease_s, int | float) or not lease_s > 0:
        raise InvalidInputError(f"lease_s must be a number > 0, got {lease_s!r}")
