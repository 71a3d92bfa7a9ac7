"""The distributed ack: all data-parallel ranks settle one optimizer step in lockstep.

Protocol (every rank calls ``distributed_ack`` at every optimizer boundary; a rank that skips
one would hang the collectives):

1. all-gather each rank's (step, ids) — the ids it trained in this step;
2. rank 0 alone writes the union in one ledger transaction (``write``); any failure becomes the
   outcome instead of being raised there;
3. rank 0 broadcasts the outcome; on failure every rank raises the same error kind and **no rank
   frees anything**;
4. on success each rank frees only its own samples' features (``free_local``);
5. all-gather the cleanup errors; if any rank failed, every rank raises ``FeatureCleanupError``
   naming each failing rank (the ledger write stands).

Written against the contracts' ``Collective`` so ``torch.distributed`` plugs in from the trainer
package; nothing here imports torch.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from dataflow.contracts import errors as taxonomy
from dataflow.contracts.checks import is_int
from dataflow.contracts.errors import DataflowError, InvalidInputError
from dataflow.contracts.protocols import Collective
from dataflow.control._abort import FeatureCleanupError

T = TypeVar("T")
WriteFn = Callable[[int, list[str]], None]
FreeFn = Callable[[int, list[str]], None]


@dataclass(frozen=True)
class DistAckResult:
    """What one successful distributed ack settled: the step, every rank's ids (rank order,
    first occurrence kept) and this rank's own ids.
    """

    step: int
    all_ids: tuple[str, ...]
    local_ids: tuple[str, ...]


def _dedup(ids: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(ids))


def _error_kind(name: str) -> type[DataflowError]:
    kind = getattr(taxonomy, name, None)
    if name == FeatureCleanupError.__name__:
        kind = FeatureCleanupError
    if isinstance(kind, type) and issubclass(kind, DataflowError):
        return kind
    return DataflowError


def _describe(exc: BaseException) -> tuple[str, str]:
    kind = type(exc).__name__ if isinstance(exc, DataflowError) else "DataflowError"
    return kind, f"{type(exc).__name__}: {exc}"


def run_on_rank0(collective: Collective, what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank, or its error to every rank.

    Every rank must call this at the same point (it holds exactly one broadcast, whatever
    happens on rank 0). On failure each rank raises the error's kind (contracts taxonomy, else
    ``DataflowError``) with ``what`` named; a result that cannot be pickled is such a failure
    (checked on rank 0 before the broadcast, so a single-process run fails like a multi-rank
    one and no rank is left waiting). Keep results small: they cross every rank.
    """
    outcome: tuple[bool, Any] | None = None
    if collective.rank == 0:
        try:
            outcome = (True, fn())
            # An object collective pickles on rank 0 before sending: failing there would leave
            # the other ranks waiting in the broadcast, so the failure is sent instead.
            pickle.dumps(outcome)
        except Exception as exc:  # broadcast below so every rank raises, none hangs
            outcome = (False, _describe(exc))
    ok, payload = collective.broadcast_object(outcome, src=0)
    if not ok:
        kind, message = payload
        raise _error_kind(kind)(f"{what} failed on rank 0 ({message})")
    result: T = payload
    return result


def distributed_ack(
    collective: Collective,
    step: int,
    local_ids: Sequence[str],
    *,
    write: WriteFn,
    free_local: FreeFn | None = None,
) -> DistAckResult:
    """Settle ``step`` across all ranks (see the module docstring for the exact protocol).

    ``write(step, all_ids)`` runs on rank 0 only; ``free_local(step, own_ids)`` runs on every
    rank after a successful write. Raises on every rank alike: the write's error kind (from the
    contracts' taxonomy, else ``DataflowError``) when the write failed or the ranks disagree on
    ``step``; ``FeatureCleanupError`` when any rank's ``free_local`` failed.
    """
    # Arguments are checked on rank 0 after the gather: a rank raising alone would hang the rest.
    own = _dedup(local_ids)
    gathered = collective.all_gather_object((step, own))
    all_ids = _dedup([sid for _, ids in gathered for sid in ids])

    def write_union() -> None:
        steps = [s for s, _ in gathered]
        if not is_int(step) or step < 0:
            raise InvalidInputError(f"step must be an int >= 0, got {step!r}")
        if any(s != step for s in steps):
            raise InvalidInputError(f"ranks disagree on the optimizer step: {steps}")
        write(step, all_ids)

    run_on_rank0(
        collective,
        f"distributed ack of step {step} (nothing was freed on any rank)",
        write_union,
    )

    cleanup_error: str | None = None
    if free_local is not None:
        try:
            free_local(step, own)
        except Exception as exc:  # gathered below so every rank raises together
            cleanup_error = f"{type(exc).__name__}: {exc}"
    cleanup = collective.all_gather_object(cleanup_error)
    failures = [f"rank {r}: {text}" for r, text in enumerate(cleanup) if text is not None]
    if failures:
        raise FeatureCleanupError(
            f"distributed ack of step {step} is committed, but freeing features failed: "
            + "; ".join(failures)
        )
    return DistAckResult(step=step, all_ids=tuple(all_ids), local_ids=tuple(own))


class SoloCollective:
    """The collective of a world of one rank: a single-process run takes the same ack path."""

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def all_gather_object(self, obj: T) -> list[T]:
        return [obj]

    def broadcast_object(self, obj: T | None, src: int = 0) -> T:
        if src != 0:
            raise InvalidInputError(f"SoloCollective has only rank 0, got src={src}")
        return obj  # type: ignore[return-value]  # rank 0 is the source: obj is given

    def barrier(self) -> None:
        return None


__all__ = ["DistAckResult", "SoloCollective", "distributed_ack", "run_on_rank0"]
