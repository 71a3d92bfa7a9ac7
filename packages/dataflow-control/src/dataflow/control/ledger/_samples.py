"""The sample state machine, written once over ``LedgerTx`` for every backend.

COMMITTED → ASSIGNED(rank, window) → TRAINED(step) → RELEASED, and DROPPED(reason) from
COMMITTED or ASSIGNED. Each function reads, validates, then writes; a refusal writes nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from dataflow.contracts.errors import InvalidInputError, NotFoundError
from dataflow.contracts.features import SampleRef
from dataflow.contracts.states import (
    CommitResult,
    ProducerState,
    PromptState,
    ReconcileResult,
    SampleState,
    Window,
)
from dataflow.control.ledger._meta import (
    IN_FLIGHT_BYTES,
    drop_counter,
    prompt_counter,
    sample_counter,
)
from dataflow.control.ledger._rules import check_dp_size, check_window_shape, conflict
from dataflow.control.ledger._tx import LedgerTx, PromptChange, SampleChange, SampleRow

PARTIAL_WINDOW = "partial_window"
"""Drop reason of the sub-quantum remainder at end of stream."""

COMMITTED = SampleState.COMMITTED
ASSIGNED = SampleState.ASSIGNED
TRAINED = SampleState.TRAINED
RELEASED = SampleState.RELEASED
DROPPED = SampleState.DROPPED
_IN_FLIGHT = (COMMITTED, ASSIGNED)


def ref_bytes(ref: SampleRef) -> int:
    """A ref's size for flow control: its estimate, else the size its specs describe."""
    return ref.estimated_bytes or ref.spec_bytes


def _apply(tx: LedgerTx, changes: Sequence[SampleChange]) -> None:
    """Write sample changes with the counters they imply (state counts, in-flight bytes)."""
    # Per (old, new) move: how many rows and their bytes (plain dicts: this runs per row).
    moves: dict[tuple[SampleState, SampleState], list[int]] = {}
    dropped: Counter[str] = Counter()
    for old, row in changes:
        new = row.state
        if old is new:
            continue
        move = moves.get((old, new))
        if move is None:
            moves[old, new] = [1, row.nbytes]
        else:
            move[0] += 1
            move[1] += row.nbytes
        if new is DROPPED:
            dropped[row.reason] += 1
    deltas: Counter[str] = Counter()
    in_flight = 0
    for (old, new), (count, nbytes) in moves.items():
        deltas[sample_counter(old)] -= count
        deltas[sample_counter(new)] += count
        was, now = old in _IN_FLIGHT, new in _IN_FLIGHT
        if was != now:
            in_flight += nbytes if now else -nbytes
    if in_flight:
        deltas[IN_FLIGHT_BYTES] += in_flight
    for reason, count in dropped.items():
        deltas[drop_counter(reason)] += count
    if changes:
        tx.update_samples(changes)
    if deltas:
        tx.add_counters(deltas)


def _describe(sample_id: str, row: SampleRow | None) -> str:
    if row is None:
        return f"unknown sample id {sample_id!r}"
    if row.state is COMMITTED:
        return f"{sample_id!r} is committed but not assigned to a window"
    if row.state is ASSIGNED:
        return f"{sample_id!r} is assigned to rank {row.rank} in window {row.window}"
    if row.state is TRAINED:
        return f"{sample_id!r} was already trained at step {row.step}"
    if row.state is RELEASED:
        return f"{sample_id!r} was already trained at step {row.step} and released"
    return f"{sample_id!r} was dropped ({row.reason})"


def _rows_in(
    tx: LedgerTx, operation: str, sample_ids: Sequence[str], allowed: Iterable[SampleState]
) -> list[SampleRow]:
    """The rows of ``sample_ids``, refusing unknown ids and ids not in an ``allowed`` state."""
    allowed = frozenset(allowed)
    rows = tx.samples(sample_ids)
    problems = [
        _describe(sid, rows.get(sid))
        for sid in sample_ids
        if sid not in rows or rows[sid].state not in allowed
    ]
    if problems:
        raise conflict(operation, problems)
    return [rows[sid] for sid in sample_ids]


def _ordered_refs(tx: LedgerTx, rows: Sequence[SampleRow]) -> list[SampleRef]:
    refs = tx.refs([row.sample_id for row in rows])
    return [refs[row.sample_id] for row in rows]


def commit(tx: LedgerTx, refs: Sequence[SampleRef]) -> CommitResult:
    """COMMIT new refs in input order; known or repeated ids are reported as duplicates.

    A fresh ref's PENDING or LEASED source task becomes DONE in the same transaction.
    """
    meta = tx.run_meta()
    if meta.producer is ProducerState.CLOSED:
        raise conflict("commit", ["the producer closed the run; no sample may follow the close"])
    for i, ref in enumerate(refs):
        if meta.run_id and ref.run_id and ref.run_id != meta.run_id:
            raise InvalidInputError(
                f"refs[{i}] ({ref.sample_id!r}) belongs to run {ref.run_id!r}, "
                f"not to this ledger's run {meta.run_id!r}"
            )
    all_tasks = list(dict.fromkeys(r.source_task_id for r in refs if r.source_task_id))
    known, prompts, next_seq = tx.commit_reads([ref.sample_id for ref in refs], all_tasks, meta)
    fresh: dict[str, SampleRef] = {}
    duplicates: list[str] = []
    for ref in refs:
        if ref.sample_id in known or ref.sample_id in fresh:
            duplicates.append(ref.sample_id)
        else:
            fresh[ref.sample_id] = ref
    if not fresh:
        return CommitResult(committed=(), duplicates=tuple(duplicates))
    rows = [
        SampleRow(sid, next_seq + i, COMMITTED, nbytes=ref_bytes(ref))
        for i, (sid, ref) in enumerate(fresh.items())
    ]
    # The source tasks of the fresh refs only (a duplicate's task was finished by its commit).
    task_ids = dict.fromkeys(r.source_task_id for r in fresh.values() if r.source_task_id)
    finished: list[PromptChange] = [
        (row.state, row._replace(state=PromptState.DONE))
        for tid in task_ids
        if (row := prompts.get(tid)) is not None
        and row.state in (PromptState.PENDING, PromptState.LEASED)
    ]
    tx.insert_samples(rows, list(fresh.values()))
    deltas: Counter[str] = Counter(
        {sample_counter(COMMITTED): len(rows), IN_FLIGHT_BYTES: sum(r.nbytes for r in rows)}
    )
    for old, _ in finished:
        deltas[prompt_counter(old)] -= 1
        deltas[prompt_counter(PromptState.DONE)] += 1
    if finished:
        tx.update_prompts(finished)
    tx.add_counters(deltas)
    if tx.stores_next_seq:
        tx.set_meta(meta.changes(next_seq=next_seq + len(rows))[1])
    return CommitResult(committed=tuple(fresh), duplicates=tuple(duplicates))


def assign_window(tx: LedgerTx, dp_size: int, per_rank: int) -> Window | None:
    """Assign the oldest quantum of COMMITTED samples as one window, or return None."""
    meta = tx.run_meta()
    check_window_shape(dp_size, per_rank, meta.quantum)
    window_id = meta.next_window
    ids = tx.assign_oldest(meta.quantum, per_rank, window_id)
    if ids is None:
        return None
    # What _apply would count: COMMITTED and ASSIGNED are both in flight, so no bytes move.
    tx.add_counters({sample_counter(COMMITTED): -len(ids), sample_counter(ASSIGNED): len(ids)})
    tx.set_meta(meta.changes(next_window=window_id + 1)[1])
    return Window(
        window_id=window_id,
        assignments=tuple(tuple(ids[r * per_rank : (r + 1) * per_rank]) for r in range(dp_size)),
    )


def assigned(tx: LedgerTx, rank: int, after_window: int) -> list[SampleRef]:
    """A rank's ASSIGNED refs in windows after ``after_window``, in window and commit order."""
    return tx.assigned_refs(rank, after_window)


def committed(tx: LedgerTx, limit: int) -> list[SampleRef]:
    """The oldest ``limit`` COMMITTED refs, in commit order (the next windows' candidates)."""
    return _ordered_refs(tx, tx.samples_in(COMMITTED, limit=limit))


def trained_through(tx: LedgerTx, step: int) -> list[SampleRef]:
    """TRAINED refs with step ≤ ``step``, in commit order (what a release would free)."""
    return _ordered_refs(tx, [row for row in tx.samples_in(TRAINED) if row.step <= step])


def refs(tx: LedgerTx, sample_ids: Sequence[str]) -> list[SampleRef]:
    """The committed refs of ``sample_ids`` (any state); an unknown id is NotFoundError."""
    found = tx.refs(sample_ids)
    missing = [sid for sid in sample_ids if sid not in found]
    if missing:
        raise NotFoundError(
            f"unknown sample id(s) {missing[:5]!r}" + (" …" if len(missing) > 5 else "")
        )
    return [found[sid] for sid in sample_ids]


def ack(tx: LedgerTx, step: int, sample_ids: Sequence[str]) -> None:
    """ASSIGNED → TRAINED(step) for every id, and record ``step``; step never goes back."""
    meta = tx.run_meta()
    if step < meta.trained_step:
        raise conflict("ack", [f"step {step} is behind the last acked step {meta.trained_step}"])
    rows = _rows_in(tx, "ack", sample_ids, (ASSIGNED,))
    _apply(
        tx,
        [
            (ASSIGNED, SampleRow(sid, seq, TRAINED, rank, window, step, reason, nbytes))
            for sid, seq, _, rank, window, _, reason, nbytes in rows
        ],
    )
    if step != meta.trained_step:
        tx.set_meta(meta.changes(trained_step=step)[1])


def drop(tx: LedgerTx, sample_ids: Sequence[str], reason: str) -> list[SampleRef]:
    """COMMITTED/ASSIGNED → DROPPED(reason); returns the dropped refs in the ids' order."""
    rows = _rows_in(tx, "drop", sample_ids, _IN_FLIGHT)
    dropped = _ordered_refs(tx, rows)
    _apply(tx, [(row.state, row._replace(state=DROPPED, reason=reason)) for row in rows])
    return dropped


def drop_partial_tail(tx: LedgerTx) -> list[SampleRef]:
    """At end of stream, drop the COMMITTED remainder (< one quantum) as ``partial_window``."""
    meta = tx.run_meta()
    if meta.producer is not ProducerState.CLOSED:
        raise conflict(
            "drop_partial_tail",
            [f"the producer is {meta.producer.value}, not closed: the tail may still fill"],
        )
    if meta.quantum <= 0:
        raise conflict("drop_partial_tail", ["the run's quantum is not set"])
    rows = tx.samples_in(COMMITTED, limit=meta.quantum)
    if len(rows) >= meta.quantum:
        raise conflict(
            "drop_partial_tail",
            [f"a full window of {meta.quantum} committed samples can still be assigned"],
        )
    dropped = _ordered_refs(tx, rows)
    _apply(tx, [(COMMITTED, row._replace(state=DROPPED, reason=PARTIAL_WINDOW)) for row in rows])
    return dropped


def release_through(tx: LedgerTx, step: int) -> list[SampleRef]:
    """TRAINED(s ≤ step) → RELEASED; returns the released refs in commit order."""
    meta = tx.run_meta()
    rows = [row for row in tx.samples_in(TRAINED) if row.step <= step]
    if not rows:
        return []
    released = _ordered_refs(tx, rows)
    _apply(tx, [(TRAINED, row._replace(state=RELEASED)) for row in rows])
    newest = max(row.step for row in rows)
    if newest > meta.released_through:
        tx.set_meta(meta.changes(released_through=newest)[1])
    return released


def reconcile(tx: LedgerTx, checkpoint_step: int, dp_size: int) -> ReconcileResult:
    """Bring the ledger back to a restored checkpoint (see the Ledger protocol)."""
    meta = tx.run_meta()
    check_dp_size(dp_size, meta.quantum)
    if checkpoint_step > meta.trained_step:
        raise conflict(
            "reconcile",
            [
                f"checkpoint step {checkpoint_step} is ahead of the last acked step "
                f"{meta.trained_step}: the ledger does not know what those steps trained on"
            ],
        )
    if checkpoint_step < meta.released_through:
        raise conflict(
            "reconcile",
            [
                f"checkpoint step {checkpoint_step} is behind step {meta.released_through}, "
                "whose samples were already released: they could not be trained again"
            ],
        )
    trained = tx.samples_in(TRAINED)
    released = [row for row in trained if row.step <= checkpoint_step]
    requeued = sorted(
        [row for row in trained if row.step > checkpoint_step] + tx.samples_in(ASSIGNED),
        key=lambda row: row.seq,
    )
    changes: list[SampleChange] = [(TRAINED, row._replace(state=RELEASED)) for row in released]
    changes += [
        (row.state, row._replace(state=COMMITTED, rank=-1, window=-1, step=-1)) for row in requeued
    ]
    _apply(tx, changes)
    newest_released = max([meta.released_through, *(row.step for row in released)])
    tx.set_meta(
        meta.changes(
            trained_step=checkpoint_step,
            durable_step=checkpoint_step,
            released_through=newest_released,
            dp_size=dp_size,
        )[1]
    )
    return ReconcileResult(
        checkpoint_step=checkpoint_step,
        released=tuple(row.sample_id for row in released),
        requeued=tuple(row.sample_id for row in requeued),
    )
