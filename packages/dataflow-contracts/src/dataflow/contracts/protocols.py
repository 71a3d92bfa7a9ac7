"""The interfaces the planes implement. Typed so mypy checks implementations against them.

Each protocol's docstrings are its contract; the planes' conformance suites test them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from dataflow.contracts.features import FeatureHandle, SampleRef
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

    State machines (ARCHITECTURE §4): samples COMMITTED → ASSIGNED → TRAINED → RELEASED, or
    DROPPED from COMMITTED/ASSIGNED; prompts PENDING → LEASED → DONE | FAILED. A transition that
    is not allowed raises ``LedgerConflictError`` and changes nothing.
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

    # prompts
    def add_prompts(self, tasks: Sequence[PromptTask]) -> CommitResult: ...

    def lease_prompts(self, worker: str, limit: int, lease_s: float) -> list[PromptTask]: ...

    def complete_prompt(self, task_id: str, worker: str) -> None: ...

    def fail_prompt(
        self, task_id: str, worker: str, reason: str, *, retryable: bool
    ) -> PromptState: ...

    # samples
    def commit(self, refs: Sequence[SampleRef]) -> CommitResult: ...

    def assign_window(self, dp_size: int, per_rank: int) -> Window | None: ...

    def assigned(self, rank: int) -> list[SampleRef]: ...

    def ack(self, step: int, sample_ids: Sequence[str]) -> None: ...

    def drop(self, sample_ids: Sequence[str], reason: str) -> list[SampleRef]: ...

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
