"""The interfaces the planes implement. Typed so mypy checks implementations against them.

Each protocol's docstrings are its contract; the planes' conformance suites test them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from dataflow.contracts.features import FeatureHandle, SampleRef
from dataflow.contracts.lease import ConsumerLease
from dataflow.contracts.prompt import PromptTask
from dataflow.contracts.states import (
    CommitResult,
    ConsumerState,
    GcReport,
    LedgerStatus,
    ProducerState,
    PromptState,
    ReconcileResult,
    RunMarkers,
    StoreHealth,
    Window,
)
from dataflow.contracts.weights import WeightVersion

T = TypeVar("T")


@runtime_checkable
class FeatureStore(Protocol):
    """Holds sample features between production and the optimizer step that used them.

    - ``put`` stores a new generation of ``sample_id`` and returns its ref (storage fields
      only; callers add provenance with ``dataclasses.replace``). Over the resident-byte budget
      it raises ``CapacityExceededError`` and changes nothing.
    - ``get`` returns the named tensors (all when ``names`` is None) and a lease. A ref to an
      older generation raises ``StaleGenerationError``; a released or aborted sample raises
      ``NotFoundError``; bytes that disagree with the ref's specs raise ``SchemaMismatchError``.
    - ``release`` returns a lease; in consume-once mode the last lease frees the sample.
      Idempotent; a stale handle never frees newer data.
    - ``abort`` frees a sample whatever its leases; idempotent.
    - ``gc`` frees unleased samples older than the store's maximum age and retries failed frees.
    """

    @property
    def uri(self) -> str: ...

    def put(
        self,
        sample_id: str,
        tensors: Mapping[str, Any],
        metadata: Mapping[str, Any] | None = None,
    ) -> SampleRef: ...

    def get(
        self, ref: SampleRef, names: Sequence[str] | None = None
    ) -> tuple[dict[str, Any], FeatureHandle]: ...

    def release(self, handle: FeatureHandle) -> None: ...

    def abort(self, sample_id: str, reason: str) -> None: ...

    def gc(self) -> GcReport: ...

    def health(self) -> StoreHealth: ...

    def close(self) -> None: ...


@runtime_checkable
class SampleAborter(Protocol):
    """The one store capability the control plane needs: freeing a dropped sample's features."""

    def abort(self, sample_id: str, reason: str) -> None: ...


@runtime_checkable
class Ledger(Protocol):
    """One run's durable source of truth; every method is one atomic transaction.

    State machines (docs/architecture.md §4): samples COMMITTED → ASSIGNED(rank, window) → TRAINED(step)
    → RELEASED, or DROPPED(reason) from COMMITTED/ASSIGNED; prompts PENDING → LEASED(worker,
    deadline) → DONE | FAILED(reason). A transition that is not allowed from a record's current
    state raises ``LedgerConflictError``; a malformed argument raises ``InvalidInputError`` (a
    tensor inside a record raises ``TypeError`` naming its path). In every refused case nothing
    changes: a call applies all of its changes or none.

    Run markers:
    - ``open_run(run_id, quantum, resume=False)`` starts a run on an empty ledger (refused on a
      ledger holding a run, samples or prompts); ``resume=True`` joins/continues the ledger's
      run (the run id must match) or starts it when the ledger is empty. ``quantum`` = samples
      per optimizer window (dp_size * per-rank); once set it is fixed: a different one is
      refused. ``quantum=0`` means "take the run's".
    - ``set_producer_state`` / ``set_consumer_state``: RUNNING from any state (restart);
      CLOSED/DONE only from RUNNING (or again, idempotently); FAILED from any state and needs a
      reason. A failure never turns into a clean end: FAILED → CLOSED/DONE is refused.
    - ``set_durable_step(step)``: the newest durable checkpoint step; never goes backwards.

    Prompts:
    - ``add_prompts``: new task ids become PENDING in input order; an id already known (in any
      state, or twice in one call) is reported as a duplicate and never queued twice.
    - ``lease_prompts(worker, limit, lease_s)`` first returns expired leases to PENDING (attempt
      + 1, or FAILED when the ledger's maximum attempts are used up), then leases up to
      ``limit`` PENDING tasks FIFO; the returned tasks carry their current attempt.
    - ``complete_prompt`` (LEASED by that worker → DONE; again on DONE: no-op) and
      ``fail_prompt`` (LEASED by that worker → PENDING with attempt + 1 when retryable and
      attempts remain, else FAILED(reason)); return the new state.
    - ``reclaim_leases(worker)``: a restarted worker gives back its leases as if they expired.
    - Committing a ref whose ``source_task_id`` is PENDING or LEASED marks that task DONE in the
      same transaction, so a finished prompt is never rolled out again.

    Samples:
    - ``commit``: idempotent on sample id; duplicates (known ids, or repeated in the call) are
      reported and never delivered twice. Refused while the producer is CLOSED.
    - ``assign_window(dp_size, per_rank)``: dp_size * per_rank must equal the run's quantum; if
      at least a quantum of samples is COMMITTED, assigns the oldest (commit order) as one
      window, rank r getting the r-th slice of per_rank ids, and returns it; else ``None``.
    - ``assigned(rank, after_window)``: that rank's ASSIGNED refs in windows after
      ``after_window``, in window and commit order. ``refs(ids)``: the committed refs by id.
      ``committed(limit)``: the oldest ``limit`` COMMITTED refs (the next window's candidates);
      ``trained_through(step)``: TRAINED refs with step ≤ ``step`` (what a release would free),
      so features can be freed before the state change that makes them unneeded.
    - ``ack(step, ids, epoch=None)``: every id must be ASSIGNED and ``step`` ≥ the last acked
      step; marks them TRAINED(step) and records the step. With ``epoch`` the ack is fenced:
      refused (``LedgerConflictError``, "stale") unless it is the current consumer lease's.

    Consumer lease (fencing, one live consumer per run): ``acquire_consumer_lease(host, pid,
    lease_s)`` bumps the epoch and records the holder; refused with ``LedgerConflictError``
    naming the holder (host, pid, since when, when it expires) while another holder's lease is
    live, unless ``takeover``. ``renew_consumer_lease(epoch, lease_s)`` extends it (a stale
    epoch is refused); ``release_consumer_lease(epoch)`` gives it up; ``consumer_lease()``
    reads it. Lease times are the ledger clock's wall-clock seconds.
    - ``drop(ids, reason)``: COMMITTED/ASSIGNED → DROPPED(reason); returns the dropped refs.
    - ``drop_partial_tail()``: at end of stream (producer CLOSED) the COMMITTED remainder,
      fewer than a quantum, becomes DROPPED("partial_window"); returns those refs.
    - ``release_through(step)``: TRAINED(s ≤ step) → RELEASED; returns the released refs.
    - ``reconcile(checkpoint_step, dp_size)``: TRAINED(s ≤ C) → RELEASED, TRAINED(s > C) and
      ASSIGNED → COMMITTED (commit order kept, so windows re-cut deterministically for any
      dp_size dividing the quantum); the acked and durable steps become C. Idempotent.
      Refused when C is ahead of the last acked step or behind ``released_through``.

    Weights: ``publish_weight`` assigns the next publish order (1, 2, …) and is idempotent on
    ``version_id`` (the stored record is returned; a different record under a known id is a
    conflict). ``weight_versions`` lists them in publish order. ``declare_target(version)``
    records the target model the producer now runs (the newest declaration wins; it is the
    run marker ``target_version``). ``record_drift`` keeps the staleness gate's latest rolling
    draft-lag figures, which ``status()`` reports as ``drift_mean``/``drift_max``.

    ``status()`` is cheap at any run length: counters kept in the same transaction as each
    transition, no scan over history.
    """

    @property
    def uri(self) -> str: ...

    @property
    def durable(self) -> bool: ...

    # run markers
    def open_run(self, run_id: str, quantum: int, *, resume: bool) -> RunMarkers: ...

    def markers(self) -> RunMarkers: ...

    def set_producer_state(self, state: ProducerState, reason: str = "") -> None: ...

    def set_consumer_state(self, state: ConsumerState, reason: str = "") -> None: ...

    def set_durable_step(self, step: int) -> None: ...

    def declare_target(self, version: str) -> None: ...

    def record_drift(self, mean_lag: float, max_lag: int) -> None: ...

    # prompts
    def add_prompts(self, tasks: Sequence[PromptTask]) -> CommitResult: ...

    def lease_prompts(self, worker: str, limit: int, lease_s: float) -> list[PromptTask]: ...

    def complete_prompt(self, task_id: str, worker: str) -> PromptState: ...

    def fail_prompt(
        self, task_id: str, worker: str, reason: str, *, retryable: bool
    ) -> PromptState: ...

    def reclaim_leases(self, worker: str) -> list[str]: ...

    # samples
    def commit(self, refs: Sequence[SampleRef]) -> CommitResult: ...

    def assign_window(self, dp_size: int, per_rank: int) -> Window | None: ...

    def assigned(self, rank: int, after_window: int = -1) -> list[SampleRef]: ...

    def committed(self, limit: int) -> list[SampleRef]: ...

    def trained_through(self, step: int) -> list[SampleRef]: ...

    def refs(self, sample_ids: Sequence[str]) -> list[SampleRef]: ...

    def ack(self, step: int, sample_ids: Sequence[str], *, epoch: int | None = None) -> None: ...

    # consumer lease
    def consumer_lease(self) -> ConsumerLease: ...

    def acquire_consumer_lease(
        self, host: str, pid: int, lease_s: float, *, takeover: bool = False
    ) -> ConsumerLease: ...

    def renew_consumer_lease(self, epoch: int, lease_s: float) -> ConsumerLease: ...

    def release_consumer_lease(self, epoch: int) -> None: ...

    def drop(self, sample_ids: Sequence[str], reason: str) -> list[SampleRef]: ...

    def drop_partial_tail(self) -> list[SampleRef]: ...

    def release_through(self, step: int) -> list[SampleRef]: ...

    def reconcile(self, checkpoint_step: int, dp_size: int) -> ReconcileResult: ...

    # weights
    def publish_weight(self, version: WeightVersion) -> WeightVersion: ...

    def weight_versions(self) -> list[WeightVersion]: ...

    def status(self) -> LedgerStatus: ...

    def close(self) -> None: ...


@runtime_checkable
class RefQueue(Protocol):
    """One rank's stream of refs to train on, in window order.

    ``get`` blocks until a ref is ready and returns it; returns ``None`` only at a clean end of
    stream (producer closed and everything drained); raises ``RunFailedError`` if the producer
    failed and ``TimeoutError`` if ``timeout`` seconds pass with nothing to return.
    """

    def get(self, timeout: float | None = None) -> SampleRef | None: ...

    def close(self) -> None: ...


@runtime_checkable
class Collective(Protocol):
    """The collective operations the distributed ack needs (torch.distributed plugs in here)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_gather_object(self, obj: T) -> list[T]: ...

    def broadcast_object(self, obj: T | None, src: int = 0) -> T: ...

    def barrier(self) -> None: ...
