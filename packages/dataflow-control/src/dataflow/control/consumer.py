"""ConsumerSide: what one trainer rank needs from the ledger.

Its queue (window-aligned dispatch on rank 0), the ack at each optimizer boundary, freeing
features by the release policy, restart reconciliation, and the consumer's run markers. Every
multi-rank step goes through the distributed ack protocol over a ``Collective``; a single
process uses ``SoloCollective`` and so takes the same path.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
from collections.abc import Sequence

from dataflow.contracts.errors import InvalidInputError, LedgerConflictError
from dataflow.contracts.protocols import Collective, Ledger, SampleAborter
from dataflow.contracts.states import ConsumerState, LedgerStatus, ReconcileResult, RunMarkers
from dataflow.control._abort import abort_features
from dataflow.control._validate import non_negative_int
from dataflow.control.dispatch import Dispatcher
from dataflow.control.dist_ack import DistAckResult, SoloCollective, distributed_ack, run_on_rank0
from dataflow.control.gate import StalenessGate
from dataflow.control.lease_keeper import DEFAULT_LEASE_S, LeaseKeeper
from dataflow.control.queue import RankQueue
from dataflow.control.window import WindowShape

_log = logging.getLogger(__name__)

TRAINED_REASON = "trained"
RECONCILED_REASON = "reconciled_released"


class ReleasePolicy(enum.StrEnum):
    """When a trained sample's features are freed.

    - ``on_checkpoint`` (default): once a checkpoint at or after the sample's step is durable,
      so a crash at any instant resumes with nothing lost and nothing trained twice;
    - ``on_ack``: at the ack (memory-lean); a resume from a checkpoint older than the last
      released step is then refused, since those samples cannot be trained again.
    """

    ON_CHECKPOINT = "on_checkpoint"
    ON_ACK = "on_ack"


class ConsumerSide:
    """One data-parallel rank's consumer over a ledger.

    ``rank`` is the data-parallel rank (the queue it reads); with sequence parallelism every
    process of a rank's group builds a side for the same ``rank`` over the job-wide
    ``collective``: all read the same queue (the same refs in the same window order, read from
    the ledger), only the job's first process (``collective.rank == 0``) dispatches and holds
    the lease, and a peer acking no ids of its own frees nothing, so each sample is acked and
    freed once.

    Guarantees: ``ack`` writes each optimizer step once (rank 0, one transaction over every
    rank's ids) before any rank frees anything; each rank frees only its own samples' features;
    ``on_checkpoint`` frees features before the ledger marks them RELEASED (a crash in between
    is settled by ``reconcile``); ``reconcile`` refuses a checkpoint older than the ledger's
    durable step and frees the features of what it released. Every rank calls ``open``,
    ``ack``, ``checkpoint_durable``, ``reconcile`` and ``finish`` in lockstep.
    """

    def __init__(
        self,
        ledger: Ledger,
        shape: WindowShape,
        *,
        rank: int = 0,
        collective: Collective | None = None,
        aborter: SampleAborter | None = None,
        release: ReleasePolicy | str = ReleasePolicy.ON_CHECKPOINT,
        gate: StalenessGate | None = None,
        dispatch: bool | None = None,
        lookahead: int = 2,
        idle_timeout_s: float | None = None,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        if not isinstance(shape, WindowShape):
            raise InvalidInputError(f"shape must be a WindowShape, got {type(shape).__name__}")
        non_negative_int("ConsumerSide", "rank", rank)
        if rank >= shape.dp_size:
            raise InvalidInputError(f"rank {rank} is outside dp_size {shape.dp_size}")
        try:
            self.release = ReleasePolicy(release)
        except ValueError:
            raise InvalidInputError(
                f"release policy {release!r} is unknown; expected one of "
                f"{[p.value for p in ReleasePolicy]}"
            ) from None
        self._ledger = ledger
        self.shape = shape
        self.rank = rank
        self._collective: Collective = collective if collective is not None else SoloCollective()
        self._aborter = aborter
        self._gate = gate
        self._dispatcher = (
            Dispatcher(ledger, shape, rank=rank, gate=gate, aborter=aborter, lookahead=lookahead)
            if ((rank == 0 and self._collective.rank == 0) if dispatch is None else dispatch)
            else None
        )
        self._idle_timeout_s = idle_timeout_s
        self._queue: RankQueue | None = None
        self._lock = threading.Lock()
        self._unreleased: list[tuple[int, list[str]]] = []  # (step, own ids) acked, not freed
        # Rank 0 holds the run's fenced consumer lease from open to finish/fail, on a durable
        # ledger (another process can open it); an in-memory one lives in this process only.
        # (Held by the process that runs ``open``: the collective's rank 0.)
        leads = rank == 0 and self._collective.rank == 0
        self._lease = LeaseKeeper(ledger, lease_s) if leads and ledger.durable else None

    @property
    def gate(self) -> StalenessGate | None:
        """The staleness gate of this side (None when staleness is off)."""
        return self._gate

    # -- run markers -------------------------------------------------------------------------

    def open(self, run_id: str, *, resume: bool = False) -> RunMarkers:
        """Open (or, with ``resume``, join/continue) the run with this shape's quantum."""

        def open_run() -> RunMarkers:
            self._ledger.open_run(run_id, self.shape.quantum, resume=resume)
            if self._lease is not None and self._lease.epoch is None:
                self._lease.acquire()  # refused, naming the holder, while another consumer runs
            self._ledger.set_consumer_state(ConsumerState.RUNNING)
            return self._ledger.markers()

        return run_on_rank0(self._collective, f"opening run {run_id!r}", open_run)

    def finish(self) -> None:
        """Mark the consumer DONE (call once every rank's queue has ended); gives the lease up."""

        def done() -> None:
            self._check_lease()
            self._ledger.set_consumer_state(ConsumerState.DONE)
            self.release_lease()

        run_on_rank0(self._collective, "marking the consumer done", done)

    def fail(self, reason: str) -> None:
        """Mark the consumer FAILED from this rank alone; every queue then raises. A consumer
        fenced off by another one's takeover only gives its lease up (the run is not its own).
        """
        if self._lease is not None:
            if self._lease.epoch is None:
                return  # never held the lease (refused at open): the run belongs to another
            try:
                self._lease.check()
            except LedgerConflictError:
                self.release_lease()
                return
        self._ledger.set_consumer_state(ConsumerState.FAILED, reason)
        self.release_lease()

    def release_lease(self) -> None:
        """Stop renewing the consumer lease and release it (idempotent)."""
        if self._lease is not None:
            self._lease.release()

    def _check_lease(self) -> None:
        if self._lease is not None:
            self._lease.check()

    # -- refs --------------------------------------------------------------------------------

    def queue(self) -> RankQueue:
        """The queue of this side's rank (one per side; take it after any ``reconcile``)."""
        if self._queue is None:
            self._queue = RankQueue(
                self._ledger,
                self.rank,
                dispatcher=self._dispatcher,
                idle_timeout_s=self._idle_timeout_s,
            )
        return self._queue

    def ack(self, step: int, sample_ids: Sequence[str]) -> DistAckResult:
        """Record optimizer ``step`` as having trained every rank's ``sample_ids``."""
        return distributed_ack(
            self._collective,
            step,
            sample_ids,
            write=self._write_ack,
            free_local=self._free_after_ack,
        )

    def checkpoint_durable(self, step: int) -> list[str]:
        """A checkpoint at ``step`` is durable: free (this rank's) features trained at ≤ step.

        Order: the ledger records the durable step, every rank frees its own features, then
        rank 0 marks the samples RELEASED; only that outcome (ok or the error) crosses ranks,
        never the released refs. Returns this rank's freed ids.
        """
        freed: list[str] = []

        def free_own(_: int, __: list[str]) -> None:
            with self._lock:
                due = [ids for s, ids in self._unreleased if s <= step]
                self._unreleased = [(s, ids) for s, ids in self._unreleased if s > step]
            for ids in due:
                freed.extend(ids)
            abort_features(self._aborter, freed, TRAINED_REASON)

        distributed_ack(
            self._collective,
            step,
            [],
            write=lambda s, _: self._ledger.set_durable_step(s),
            free_local=free_own,
        )

        def mark_released() -> None:
            # The refs stay on rank 0: each rank already freed its own features above.
            self._ledger.release_through(step)

        run_on_rank0(
            self._collective, f"releasing samples trained through step {step}", mark_released
        )
        return freed

    def reconcile(self, checkpoint_step: int) -> ReconcileResult:
        """Settle the ledger with the restored checkpoint (docs/architecture.md §4), for this dp_size.

        TRAINED at ≤ C become RELEASED (features freed), later TRAINED and ASSIGNED return to
        COMMITTED. Refused (``LedgerConflictError``, nothing changed, nothing freed) when C is
        ahead of the last acked step, older than the ledger's durable step or than the last
        released step.
        """
        if self._queue is not None:
            raise InvalidInputError("reconcile must run before this rank's queue is taken")

        def settle() -> ReconcileResult:
            markers = self._ledger.markers()
            durable = markers.durable_step
            if checkpoint_step > markers.trained_step:
                # checked here too: the frees below must never run for a refused reconcile
                raise LedgerConflictError(
                    f"checkpoint step {checkpoint_step} is ahead of the last acked step "
                    f"{markers.trained_step}: the ledger does not know what those steps trained"
                )
            if checkpoint_step < durable:
                raise LedgerConflictError(
                    f"checkpoint step {checkpoint_step} is older than the durable checkpoint "
                    f"step {durable} recorded in the ledger: features of samples trained up to "
                    f"step {durable} may already be freed; restore a checkpoint at or after it"
                )
            # Free before the ledger marks them RELEASED: a crash in between is redone.
            due = self._ledger.trained_through(checkpoint_step) if checkpoint_step >= 0 else []
            freed = {ref.sample_id for ref in due}
            abort_features(self._aborter, [ref.sample_id for ref in due], RECONCILED_REASON)
            result = self._ledger.reconcile(checkpoint_step, self.shape.dp_size)
            rest = [sid for sid in result.released if sid not in freed]
            abort_features(self._aborter, rest, RECONCILED_REASON)
            return result

        result = run_on_rank0(
            self._collective, f"reconcile to checkpoint step {checkpoint_step}", settle
        )
        _log.info(
            "reconciled the ledger to checkpoint step %d (dp_size %d): %d released, %d requeued",
            checkpoint_step,
            self.shape.dp_size,
            len(result.released),
            len(result.requeued),
        )
        with self._lock:
            self._unreleased.clear()
        return result

    def status(self) -> LedgerStatus:
        """The ledger's status, with the drift figures of this side's staleness gate."""
        status = self._ledger.status()
        if self._gate is None:
            return status
        drift = self._gate.drift.snapshot()
        return dataclasses.replace(status, drift_mean=drift.mean_lag, drift_max=drift.max_lag)

    # -- internals ---------------------------------------------------------------------------

    def _write_ack(self, step: int, ids: list[str]) -> None:
        epoch = self._lease.epoch if self._lease is not None else None
        self._ledger.ack(step, ids, epoch=epoch)  # a stale epoch is refused by the ledger
        _log.debug("acked step %d: %d sample(s) TRAINED", step, len(ids))
        if self.release is ReleasePolicy.ON_ACK:
            self._ledger.release_through(step)

    def _free_after_ack(self, step: int, own: list[str]) -> None:
        if self.release is ReleasePolicy.ON_ACK:
            abort_features(self._aborter, own, TRAINED_REASON)
        else:
            with self._lock:
                self._unreleased.append((step, list(own)))
