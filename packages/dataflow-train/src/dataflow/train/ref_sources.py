"""Where a loader's refs come from: a fixed list dealt over ranks, or a rank's ref queue.

A source yields lists of refs, one list per batch, and knows nothing of stores or tensors.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from dataflow.contracts import InvalidInputError, RefQueue, SampleRef


class RefSettler(Protocol):
    """Takes responsibility for refs the loader will never train (refused or partial batches).

    Called with refs that were never materialised or whose leases were all returned; it must
    make sure their features do not stay resident (e.g. abort them, drop them in the ledger).
    """

    def settle(self, refs: Sequence[SampleRef], reason: str) -> None: ...


@dataclass(frozen=True)
class AbortSettler:
    """Settles refs by aborting their features in the store (consume-once online refs)."""

    store: _Aborter

    def settle(self, refs: Sequence[SampleRef], reason: str) -> None:
        for ref in refs:
            self.store.abort(ref.sample_id, reason)


class _Aborter(Protocol):
    def abort(self, sample_id: str, reason: str) -> None: ...


class _Dropper(Protocol):
    def drop(self, sample_ids: Sequence[str], reason: str) -> object: ...


@dataclass(frozen=True)
class LedgerDropSettler:
    """Settles online refs for good: DROPPED in the ledger (so no restart re-delivers them),
    then their features aborted in the store. The reason's first line, cut to ``max_reason``
    characters, is what the ledger records.
    """

    ledger: _Dropper
    store: _Aborter
    max_reason: int = 120

    def settle(self, refs: Sequence[SampleRef], reason: str) -> None:
        short = reason.splitlines()[0][: self.max_reason] if reason else "refused"
        self.ledger.drop([ref.sample_id for ref in refs], short)
        for ref in refs:
            self.store.abort(ref.sample_id, short)


@dataclass(frozen=True)
class FixedRefPlan:
    """A fixed ref list cut into per-rank batches, reshuffled per epoch from one seed.

    Guarantees: every rank computes the same global order for an epoch (seeded by ``seed`` and
    the epoch only); global batch ``g`` goes to rank ``g % world_size``; every rank gets the same
    number of batches (a tail that cannot be dealt evenly is left out of the epoch).
    """

    refs: tuple[SampleRef, ...]
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise InvalidInputError(f"rank {self.rank} is not within world_size {self.world_size}")
        # A SampleRef admits only checked ids, specs and frozen JSON metadata, so a list of them
        # holds no tensor; walking every field of every ref (tens of us each) would re-prove it.
        for i, ref in enumerate(self.refs):
            if not isinstance(ref, SampleRef):
                raise InvalidInputError(f"refs[{i}] is a {type(ref).__name__}, not a SampleRef")
        ids = [ref.sample_id for ref in self.refs]
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise InvalidInputError(f"refs contain duplicate sample ids: {dupes[:5]}")

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank gets per epoch."""
        return (len(self.refs) // self.batch_size) // self.world_size

    def order(self, epoch: int) -> list[int]:
        """The global ref order of ``epoch`` (indices into ``refs``)."""
        indices = list(range(len(self.refs)))
        if self.shuffle:
            random.Random(f"dataflow-loader:{self.seed}:{epoch}").shuffle(indices)
        return indices

    def batches(self, epoch: int, start: int) -> Iterator[list[SampleRef]]:
        """Yield this rank's batches of ``epoch`` from batch index ``start``; skipped ones cost nothing."""
        order = self.order(epoch)
        for local in range(start, self.batches_per_epoch):
            first = (local * self.world_size + self.rank) * self.batch_size
            yield [self.refs[i] for i in order[first : first + self.batch_size]]


class QueueRefSource:
    """Pulls batches of refs from one rank's consume-once :class:`RefQueue`.

    Guarantees: ``batches`` yields full batches in queue order; at a clean end of stream a
    partial batch is handed to ``on_partial`` and iteration ends (a ``stop`` never settles one); ``TimeoutError`` is raised once
    ``idle_timeout_s`` passes without a ref (``None`` waits for ever); ``stop`` makes a blocked
    pull return within ``poll_s``. Every ref pulled is reported to ``on_pulled`` first, so a
    caller can account for refs the consumer never received.
    """

    def __init__(
        self, queue: RefQueue, batch_size: int, idle_timeout_s: float | None, poll_s: float = 0.1
    ) -> None:
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        self._queue = queue
        self._batch_size = batch_size
        self._idle_timeout_s = idle_timeout_s
        self._poll_s = poll_s

    def batches(
        self,
        stop: threading.Event,
        on_pulled: _RefsCallback,
        on_partial: _RefsCallback,
    ) -> Iterator[list[SampleRef]]:
        while not stop.is_set():
            batch: list[SampleRef] = []
            while len(batch) < self._batch_size:
                ref = self._pull(stop)
                if ref is None:
                    # Only a clean end of stream settles a partial batch. A stop is not one:
                    # the refs pulled so far were reported to on_pulled and go back to the
                    # caller (their windows are still assigned in the ledger; a resume trains
                    # them, so their features must stay).
                    if batch and not stop.is_set():
                        on_partial(batch)
                    return
                on_pulled([ref])
                batch.append(ref)
            yield batch

    def _pull(self, stop: threading.Event) -> SampleRef | None:
        deadline = None if self._idle_timeout_s is None else time.monotonic() + self._idle_timeout_s
        while not stop.is_set():
            slice_s = self._poll_s
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"no ref arrived on the rank's queue within {self._idle_timeout_s}s"
                    )
                slice_s = min(slice_s, left)
            try:
                return self._queue.get(timeout=slice_s)
            except TimeoutError:
                continue
        return None


class _RefsCallback(Protocol):
    def __call__(self, refs: list[SampleRef]) -> None: ...
