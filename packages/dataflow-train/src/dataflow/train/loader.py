"""FeatureDataLoader: refs in, collated :class:`TrainBatch` out, every store lease returned.

Two sources, one mechanism: a fixed ref list (re-iterable, seeded shuffle per epoch, seekable
without fetching what it skips) or one rank's consume-once ref queue. Fetching can run on a
bounded prefetch thread; whatever it fetched but never handed over is returned by ``close``.
"""

from __future__ import annotations

import queue as queue_mod
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from dataflow.contracts import (
    BackendUnavailableError,
    ClosedError,
    FeatureHandle,
    FeatureStore,
    InvalidInputError,
    RefQueue,
    SampleRef,
    SchemaMismatchError,
    TrainBatch,
)
from dataflow.contracts.checks import is_int
from dataflow.contracts.features import FEATURE_SCHEMA_VERSION
from dataflow.train.batch_buffers import BatchBuffers
from dataflow.train.collate import check_refs_agree, collate
from dataflow.train.ref_sources import AbortSettler, FixedRefPlan, QueueRefSource, RefSettler
from dataflow.train.sample_checks import (
    BadSampleError,
    length_problem,
    sample_problem,
    values_surely_fine,
)


@dataclass(frozen=True)
class _End:
    pass


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class FeatureDataLoader:
    """Iterates :class:`TrainBatch` es for one rank.

    Guarantees:
    - every ``store.get`` is paired with a ``store.release`` on every path; a batch's leases
      are returned as soon as it is collated (collation copies, so a batch never holds one);
    - refs that cannot share a batch (strategy, schema version, feature names, dtypes, ranks)
      are refused with :class:`SchemaMismatchError` and handed to the settler before it is raised;
      a partial batch at a clean end of a queue stream is settled the same way;
    - refs mode: ``state_dict``/``load_state_dict`` hold the position (epoch, batch), and the
      next iteration starts there without fetching the skipped batches;
    - a sample whose values are bad (NaN/inf features, no tokens, longer than ``max_length``,
      a loss mask not 0/1: :func:`~dataflow.train.sample_checks.sample_problem`) never trains:
      it is handed to the settler with its reason and recorded in ``bad_samples``; past
      ``max_bad_samples`` of them, or when no sample of a batch is left, the loader raises
      :class:`~dataflow.train.sample_checks.BadSampleError` naming them;
    - with ``reuse_buffers`` (the default) batches are collated into a small pool of kept
      buffers, one reused only once nothing references it any more (every batch, view and
      autograd-saved tensor of it dropped: :mod:`~dataflow.train.batch_buffers`), so a batch
      a caller still holds is never overwritten; at most ``4 * (prefetch + 3)`` are kept, and
      ``close`` drops them;
    - at most ``prefetch`` batches are fetched ahead; ``close`` stops the prefetch thread within
      ``join_timeout_s`` and returns every ref fetched from the source but never yielded.
    """

    def __init__(
        self,
        store: FeatureStore,
        *,
        refs: Sequence[SampleRef] | None = None,
        queue: RefQueue | None = None,
        batch_size: int = 1,
        strategy: str = "eagle3",
        schema_version: int = FEATURE_SCHEMA_VERSION,
        shuffle: bool = True,
        seed: int = 0,
        num_epochs: int = 1,
        rank: int = 0,
        world_size: int = 1,
        pad_multiple: int = 1,
        prefetch: int = 0,
        idle_timeout_s: float | None = None,
        settler: RefSettler | None = None,
        join_timeout_s: float = 5.0,
        max_length: int | None = None,
        max_bad_samples: int = 0,
        reuse_buffers: bool = True,
    ) -> None:
        if (refs is None) == (queue is None):
            raise InvalidInputError("FeatureDataLoader needs exactly one of refs= or queue=")
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("num_epochs", num_epochs, 1),
            ("pad_multiple", pad_multiple, 1),
            ("prefetch", prefetch, 0),
            ("max_bad_samples", max_bad_samples, 0),
        ):
            if not is_int(value) or value < low:
                raise InvalidInputError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(reuse_buffers, bool):
            raise InvalidInputError(f"reuse_buffers must be a bool, got {reuse_buffers!r}")
        if not isinstance(strategy, str) or not strategy:
            raise InvalidInputError(f"strategy must be a non-empty str, got {strategy!r}")
        self._store = store
        self._plan = (
            FixedRefPlan(tuple(refs), batch_size, seed, shuffle, rank, world_size)
            if refs is not None
            else None
        )
        self._queue_source = (
            QueueRefSource(queue, batch_size, idle_timeout_s) if queue is not None else None
        )
        self._batch_size = batch_size
        self._strategy = strategy
        self._schema_version = schema_version
        self._num_epochs = num_epochs
        self._pad_multiple = pad_multiple
        self._prefetch = prefetch
        self._join_timeout_s = join_timeout_s
        self._max_length = max_length
        self._max_bad = max_bad_samples
        self._buffers = BatchBuffers(4 * (prefetch + 3)) if reuse_buffers else None
        self.bad_samples: dict[str, str] = {}
        """Samples refused for their feature values, with the reason (they never trained)."""
        # Online refs are consume-once: nobody else will ever train a refused one, so its
        # features are freed. Offline refs belong to a retained dataset and are left alone.
        self._settler: RefSettler | None = settler
        if settler is None and queue is not None:
            self._settler = AbortSettler(store)
        self._epoch = 0
        self._batch = 0
        self._yielded_batches = 0
        self._lock = threading.Lock()
        self._pending: dict[str, SampleRef] = {}
        self._returned: list[SampleRef] = []
        self._active: Iterator[TrainBatch] | None = None
        self._closed = False

    # ----------------------------------------------------------------- position
    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to (refs mode); 0 in queue mode."""
        return self._epoch

    @property
    def planned_batches(self) -> int | None:
        """Batches this rank will yield from the start of training; ``None`` for a stream."""
        if self._plan is None:
            return None
        return self._plan.batches_per_epoch * self._num_epochs

    def state_dict(self) -> dict[str, Any]:
        """The position and the facts it is only valid for (JSON-compatible)."""
        if self._plan is None:
            return {"mode": "queue", "yielded_batches": self._yielded_batches}
        return {
            "mode": "refs",
            "epoch": self._epoch,
            "batch": self._batch,
            "yielded_batches": self._yielded_batches,
            "num_refs": len(self._plan.refs),
            "batch_size": self._batch_size,
            "seed": self._plan.seed,
            "shuffle": self._plan.shuffle,
            "world_size": self._plan.world_size,
            "rank": self._plan.rank,
        }

    @property
    def batch_size(self) -> int:
        """Samples per batch (per rank)."""
        return self._batch_size

    def contract(self) -> dict[str, Any]:
        """The plan facts a checkpoint's position is only valid for, whatever the number of
        ranks (same on every rank): the data, its order, the batch size and the samples one
        epoch deals out over all ranks, so a resume on another number of ranks trains the same
        samples in the same global order.
        """
        state = self.state_dict()
        for key in ("epoch", "batch", "yielded_batches", "rank", "world_size"):
            state.pop(key, None)
        state["num_epochs"] = self._num_epochs
        state["pad_multiple"] = self._pad_multiple
        if self._plan is not None:
            plan = self._plan
            state["epoch_samples"] = plan.batches_per_epoch * plan.world_size * plan.batch_size
        return state

    def seek(self, yielded_batches: int) -> None:
        """Position the loader as if it had yielded ``yielded_batches`` batches from the start.

        The position a resume on another number of ranks derives from the step (``step x
        accumulation_steps`` batches per rank): refs mode computes the epoch and batch of this
        rank's plan, queue mode only sets the count (the controller re-delivers the rest).
        Raises :class:`InvalidInputError` past the plan's end, changing nothing.
        """
        if self._active is not None:
            raise InvalidInputError("cannot seek a loader while it is being iterated")
        if not is_int(yielded_batches) or yielded_batches < 0:
            raise InvalidInputError(f"yielded_batches must be an int >= 0, got {yielded_batches!r}")
        if self._plan is None:
            self._yielded_batches = yielded_batches
            return
        per_epoch = self._plan.batches_per_epoch
        epoch, batch = divmod(yielded_batches, per_epoch) if per_epoch else (0, 0)
        if epoch > self._num_epochs or (epoch == self._num_epochs and batch):
            raise InvalidInputError(
                f"a position of {yielded_batches} batches is past the plan's end "
                f"({self._num_epochs} epochs of {per_epoch} batches)"
            )
        self._epoch, self._batch, self._yielded_batches = epoch, batch, yielded_batches

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Seek to a saved position; refuses a position saved under a different plan.

        Raises :class:`InvalidInputError` naming every differing field, or an out-of-range
        position, and changes nothing then. In queue mode only the yielded-batch count is
        restored: the controller re-delivers what is left to train.
        """
        if self._active is not None:
            raise InvalidInputError("cannot load a loader position while it is being iterated")
        mine = self.state_dict()
        keys = ("mode", "num_refs", "batch_size", "seed", "shuffle", "world_size", "rank")
        diffs = [
            f"{k}: saved {state.get(k)!r}, now {mine[k]!r}"
            for k in keys
            if k in mine and state.get(k) != mine[k]
        ]
        if diffs:
            raise InvalidInputError("loader position belongs to another plan: " + "; ".join(diffs))
        yielded = int(state.get("yielded_batches", 0))
        if self._plan is None:
            self._yielded_batches = yielded
            return
        epoch, batch = int(state["epoch"]), int(state["batch"])
        per_epoch = self._plan.batches_per_epoch
        if not (0 <= epoch <= self._num_epochs and 0 <= batch < max(per_epoch, 1)) or (
            epoch == self._num_epochs and batch != 0
        ):
            raise InvalidInputError(
                f"loader position epoch={epoch} batch={batch} is outside the plan "
                f"({self._num_epochs} epochs of {per_epoch} batches)"
            )
        self._epoch, self._batch, self._yielded_batches = epoch, batch, yielded

    # ---------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[TrainBatch]:
        if self._closed:
            raise ClosedError("the loader was closed")
        if self._active is not None:
            raise InvalidInputError("the loader is already being iterated")
        self._active = self._iterate()
        return self._active

    def close(self) -> list[SampleRef]:
        """Stop iterating; return every ref fetched from the source but never yielded.

        Idempotent; later iteration raises :class:`ClosedError`. The caller settles the
        returned refs (for online refs: hand them back to the controller). If the prefetch
        thread does not stop in time (a hung store get) this raises
        :class:`BackendUnavailableError`; the next ``close`` returns the refs.
        """
        self._closed = True
        active, self._active = self._active, None
        if active is not None:
            active.close()  # type: ignore[attr-defined]
        with self._lock:
            returned, self._returned = self._returned, []
        if self._buffers is not None:
            self._buffers.clear()
        return returned

    def _iterate(self) -> Iterator[TrainBatch]:
        stop = threading.Event()
        try:
            if self._prefetch == 0:
                for refs in self._ref_batches(stop):
                    batch = self._materialise(refs)
                    self._advance(batch)
                    yield batch
            else:
                yield from self._prefetched(stop)
        finally:
            stop.set()
            with self._lock:
                self._returned.extend(self._pending.values())
                self._pending.clear()
            self._active = None

    def _advance(self, batch: TrainBatch) -> None:
        with self._lock:
            for sample_id in batch.sample_ids:
                self._pending.pop(sample_id, None)
        self._yielded_batches += 1
        if self._plan is not None:
            self._batch += 1
            if self._batch >= self._plan.batches_per_epoch:
                self._epoch, self._batch = self._epoch + 1, 0

    def _ref_batches(self, stop: threading.Event) -> Iterator[list[SampleRef]]:
        if self._plan is not None:
            for epoch in range(self._epoch, self._num_epochs):
                start = self._batch if epoch == self._epoch else 0
                for refs in self._plan.batches(epoch, start):
                    self._track(refs)
                    yield refs
                    if stop.is_set():
                        return
            return
        assert self._queue_source is not None
        yield from self._queue_source.batches(stop, self._track, self._settle_partial)

    def _track(self, refs: list[SampleRef]) -> None:
        with self._lock:
            for ref in refs:
                self._pending[ref.sample_id] = ref

    def _untrack(self, refs: Sequence[SampleRef]) -> None:
        with self._lock:
            for ref in refs:
                self._pending.pop(ref.sample_id, None)

    def _settle(self, refs: Sequence[SampleRef], reason: str) -> None:
        self._untrack(refs)
        if self._settler is not None:
            self._settler.settle(refs, reason)

    def _settle_partial(self, refs: list[SampleRef]) -> None:
        self._settle(
            refs, f"partial_batch: {len(refs)} of {self._batch_size} refs at end of stream"
        )

    def _fetched(self, stop: threading.Event) -> Iterator[TrainBatch]:
        for refs in self._ref_batches(stop):
            yield self._materialise(refs)

    def _materialise(self, refs: list[SampleRef]) -> TrainBatch:
        try:
            check_refs_agree(refs, self._strategy, self._schema_version)
            return self._fetch_and_collate(refs)
        except SchemaMismatchError as exc:
            self._settle(refs, f"schema_mismatch: {exc}")
            raise

    def _fetch_and_collate(self, refs: list[SampleRef]) -> TrainBatch:
        # Collation copies every feature into fresh batch tensors, so the store's buffers are
        # read while the leases are held and never referenced after they are returned.
        handles: list[FeatureHandle] = []
        bad: dict[str, str] = {}
        batch: TrainBatch | None = None
        try:
            samples, kept = [], []
            get, max_length = self._store.get, self._max_length
            for ref in refs:
                tensors, handle = get(ref)
                handles.append(handle)
                checked = _checked_tensors(ref, tensors)
                problem = length_problem(checked, max_length)
                if problem is not None:
                    bad[ref.sample_id] = problem
                    continue
                samples.append(checked)
                kept.append(ref.sample_id)
            if kept:
                batch = self._collate(refs, kept, samples)
                # The value checks read the batch once (one reduction per feature); only when
                # it is not surely clean is each sample asked, to name the bad ones exactly.
                if not values_surely_fine(cast("Mapping[str, torch.Tensor]", batch.tensors)):
                    clean = []
                    for sample_id, sample in zip(kept, samples, strict=True):
                        problem = sample_problem(sample, self._max_length)
                        if problem is None:
                            clean.append((sample_id, sample))
                        else:
                            bad[sample_id] = problem
                    if len(clean) < len(kept):
                        batch = (
                            self._collate(refs, [c[0] for c in clean], [c[1] for c in clean])
                            if clean
                            else None
                        )
        finally:
            self._release_all(handles)
        if bad:
            self._refuse_bad(refs, bad, batch is None)
        assert batch is not None
        return batch

    def _collate(
        self, refs: list[SampleRef], kept: list[str], samples: list[dict[str, torch.Tensor]]
    ) -> TrainBatch:
        return collate(
            kept,
            samples,
            strategy=self._strategy,
            pad_multiple=self._pad_multiple,
            metadata={"schema_version": refs[0].schema_version},
            buffers=self._buffers,
        )

    def _refuse_bad(self, refs: list[SampleRef], bad: dict[str, str], empty: bool) -> None:
        """Settle the bad samples (their leases already returned); raise past the threshold."""
        for ref in refs:
            if ref.sample_id in bad:
                self._settle([ref], bad[ref.sample_id])
        self.bad_samples.update(bad)
        listed = "; ".join(f"{sid}: {why}" for sid, why in sorted(self.bad_samples.items())[:10])
        if len(self.bad_samples) > self._max_bad:
            raise BadSampleError(
                f"{len(self.bad_samples)} samples with bad feature values (more than "
                f"trainer.max_bad_samples={self._max_bad}); none of them trained: {listed}"
            )
        if empty:
            raise BadSampleError(f"every sample of a batch has bad feature values: {listed}")

    def _release_all(self, handles: list[FeatureHandle]) -> None:
        first: BaseException | None = None
        for handle in handles:
            try:
                self._store.release(handle)
            except Exception as exc:  # release the rest first, then report the first failure
                first = first or exc
        if first is not None:
            raise first

    # ----------------------------------------------------------------- prefetch
    def _prefetched(self, stop: threading.Event) -> Iterator[TrainBatch]:
        # Two C-level queues, no Python condition variable: ``out`` carries whole batches, and
        # ``slots`` holds one token per batch the worker may still hand over, so at most
        # ``prefetch`` wait in ``out`` (the worker holds one more while it waits for a slot).
        out: queue_mod.SimpleQueue[TrainBatch | _End | _Failed] = queue_mod.SimpleQueue()
        slots: queue_mod.SimpleQueue[None] = queue_mod.SimpleQueue()
        for _ in range(self._prefetch):
            slots.put(None)
        worker = threading.Thread(
            target=self._work, args=(stop, out, slots), name="loader-prefetch", daemon=True
        )
        worker.start()
        try:
            while True:
                item = out.get()
                slots.put(None)
                if type(item) is _End:
                    return
                if type(item) is _Failed:
                    raise item.error
                batch = cast("TrainBatch", item)
                self._advance(batch)
                yield batch
        finally:
            stop.set()
            self._stop_worker(worker, out)

    def _work(
        self,
        stop: threading.Event,
        out: queue_mod.SimpleQueue[Any],
        slots: queue_mod.SimpleQueue[None],
    ) -> None:
        try:
            for batch in self._fetched(stop):
                if not _put(out, slots, batch, stop):
                    return
            _put(out, slots, _End(), stop)
        except BaseException as exc:  # forwarded to the consumer, raised there
            _put(out, slots, _Failed(exc), stop)

    def _stop_worker(self, worker: threading.Thread, out: queue_mod.SimpleQueue[Any]) -> None:
        worker.join(self._join_timeout_s)
        # Batches fetched but never handed over hold no lease; their refs stay pending.
        while not out.empty():
            out.get_nowait()
        if worker.is_alive():
            with self._lock:
                stuck = sorted(self._pending)
            raise BackendUnavailableError(
                f"the prefetch thread did not stop within {self._join_timeout_s}s (a store get "
                f"may be hung); never-yielded samples: {stuck}"
            )


def _put(
    out: queue_mod.SimpleQueue[Any],
    slots: queue_mod.SimpleQueue[None],
    item: object,
    stop: threading.Event,
) -> bool:
    """Hand ``item`` over once a slot is free; ``False`` (not handed over) once ``stop`` is set."""
    while not stop.is_set():
        try:
            slots.get(timeout=0.05)
        except queue_mod.Empty:
            continue
        out.put(item)
        return True
    return False


def _checked_tensors(ref: SampleRef, tensors: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise SchemaMismatchError(
                f"feature {name!r} of sample {ref.sample_id!r} came back as "
                f"{type(value).__name__}, not a tensor"
            )
    return dict(tensors)
