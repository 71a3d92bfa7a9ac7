"""The ledger's states and the tensor-free reports it and the stores hand out."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from dataflow.contracts.frozen import frozen_dict

MAX_REASON_LENGTH = 200
"""The longest reason (prompt failure, drop, run failure) a ledger stores."""


def clip_reason(text: str) -> str:
    """``text`` as a reason every ledger accepts: each non-printable character (a newline in an
    exception's message, say) becomes a space, and text over :data:`MAX_REASON_LENGTH` is cut to
    that length, ending in ``…``. Printable text within the limit is returned unchanged.
    """
    flat = "".join(ch if ch.isprintable() else " " for ch in text)
    if len(flat) <= MAX_REASON_LENGTH:
        return flat
    return flat[: MAX_REASON_LENGTH - 1] + "…"


class SampleState(enum.StrEnum):
    """Where a sample is in its life (docs/architecture.md §4)."""

    COMMITTED = "committed"
    ASSIGNED = "assigned"
    TRAINED = "trained"
    RELEASED = "released"
    DROPPED = "dropped"


class PromptState(enum.StrEnum):
    """Where a prompt task is in its life."""

    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"


class ProducerState(enum.StrEnum):
    """The producer side's run marker; ``failed`` never reads as a clean end of stream."""

    NOT_STARTED = "not_started"
    RUNNING = "running"
    CLOSED = "closed"
    FAILED = "failed"


class ConsumerState(enum.StrEnum):
    """The consumer side's run marker."""

    NOT_STARTED = "not_started"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class RunMarkers:
    """The run-level facts a ledger keeps besides samples and prompts.

    ``quantum`` is fixed once set (0 = not set yet). ``durable_step`` is the newest durable
    checkpoint step, ``trained_step`` the newest acked optimizer step and ``released_through``
    the newest step whose samples were released (features freed); -1 = none yet. ``dp_size`` is
    the data-parallel size of the last reconcile (0 = never reconciled). ``target_version`` is
    the target model the newest producer declared (empty until one did): the staleness gate's
    current target.
    """

    run_id: str = ""
    quantum: int = 0
    durable_step: int = -1
    producer: ProducerState = ProducerState.NOT_STARTED
    producer_reason: str = ""
    consumer: ConsumerState = ConsumerState.NOT_STARTED
    consumer_reason: str = ""
    trained_step: int = -1
    released_through: int = -1
    dp_size: int = 0
    target_version: str = ""


@dataclass(frozen=True)
class LedgerStatus:
    """A snapshot of a ledger, cheap to take at any run length.

    ``samples`` and ``prompts`` map every state's value to a count (zeros included);
    ``in_flight`` = committed + assigned samples, ``in_flight_bytes`` their estimated bytes.
    ``dropped_reasons`` counts dropped samples per reason.
    """

    backend: str
    durable: bool
    markers: RunMarkers
    samples: Mapping[str, int] = field(default_factory=dict, hash=False)
    prompts: Mapping[str, int] = field(default_factory=dict, hash=False)
    in_flight: int = 0
    in_flight_bytes: int = 0
    dropped_reasons: Mapping[str, int] = field(default_factory=dict, hash=False)
    latest_weight_order: int = 0
    drift_mean: float | None = None
    drift_max: int | None = None

    def __post_init__(self) -> None:
        for name in ("samples", "prompts", "dropped_reasons"):
            object.__setattr__(self, name, frozen_dict(getattr(self, name)))

    @property
    def backlog(self) -> int:
        """Committed samples not yet assigned to a window."""
        return self.samples.get(SampleState.COMMITTED.value, 0)


@dataclass(frozen=True)
class StoreHealth:
    """Tensor-free figures of a feature store; after a full drain they return to the baseline."""

    backend: str
    resident_samples: int = 0
    resident_bytes: int = 0
    active_leases: int = 0
    pending_frees: int = 0
    oldest_age_s: float = 0.0
    budget_bytes: int | None = None


@dataclass(frozen=True)
class GcReport:
    """What one ``gc()`` pass did."""

    freed_samples: int = 0
    freed_bytes: int = 0
    retried_frees: int = 0
    failed_frees: int = 0


@dataclass(frozen=True)
class CommitResult:
    """Outcome of committing refs: which were new, which were already known (never re-delivered)."""

    committed: tuple[str, ...] = ()
    duplicates: tuple[str, ...] = ()


@dataclass(frozen=True)
class Window:
    """One optimizer window: ``assignments[rank]`` is that rank's ordered sample ids."""

    window_id: int
    assignments: tuple[tuple[str, ...], ...]

    @property
    def size(self) -> int:
        """Samples in the window (= the quantum)."""
        return sum(len(ids) for ids in self.assignments)


@dataclass(frozen=True)
class ReconcileResult:
    """What restart reconciliation did for a restored checkpoint step."""

    checkpoint_step: int
    released: tuple[str, ...] = ()
    requeued: tuple[str, ...] = ()
