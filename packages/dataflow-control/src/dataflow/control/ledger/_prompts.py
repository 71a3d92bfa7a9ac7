"""The prompt-task state machine, written once over ``LedgerTx`` for every backend.

PENDING → LEASED(worker, deadline) → DONE | FAILED(reason). A retryable failure, an expired
lease or a reclaimed lease sends the task back to the tail of PENDING with attempt + 1, until
``max_attempts`` attempts are used up; then it is FAILED with the reason and the count.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

from dataflow.contracts.prompt import PromptTask
from dataflow.contracts.states import CommitResult, PromptState
from dataflow.control.ledger._meta import RunMeta, prompt_counter
from dataflow.control.ledger._rules import conflict
from dataflow.control.ledger._tx import LedgerTx, PromptChange, PromptRow

PENDING = PromptState.PENDING
LEASED = PromptState.LEASED
DONE = PromptState.DONE
FAILED = PromptState.FAILED


class _Changes:
    """Prompt changes of one transaction, merged per task, with FIFO order handed out."""

    def __init__(self, meta: RunMeta) -> None:
        self.meta = meta
        self.next_seq = meta.next_prompt_seq
        self.by_id: dict[str, PromptChange] = {}

    def set(self, row: PromptRow, new: PromptRow) -> PromptRow:
        old = self.by_id[row.task_id][0] if row.task_id in self.by_id else row.state
        self.by_id[row.task_id] = (old, new)
        return new

    def retry(self, row: PromptRow, reason: str, max_attempts: int) -> PromptRow:
        """Back to the tail of PENDING with attempt + 1, or FAILED once attempts run out."""
        attempt = row.attempt + 1
        if attempt < max_attempts:
            new = PromptRow(row.task_id, self.next_seq, PENDING, attempt)
            self.next_seq += 1
        else:
            new = row._replace(
                state=FAILED,
                worker="",
                deadline=0.0,
                reason=f"{reason} (attempts exhausted: {attempt})",
            )
        return self.set(row, new)

    def write(self, tx: LedgerTx) -> None:
        changes = list(self.by_id.values())
        deltas: Counter[str] = Counter()
        for old, new in changes:
            if old is not new.state:
                deltas[prompt_counter(old)] -= 1
                deltas[prompt_counter(new.state)] += 1
        if changes:
            tx.update_prompts(changes)
        if deltas:
            tx.add_counters(deltas)
        if self.next_seq != self.meta.next_prompt_seq:
            tx.set_meta(self.meta.changes(next_prompt_seq=self.next_seq)[1])


def add_prompts(tx: LedgerTx, tasks: Sequence[PromptTask]) -> CommitResult:
    """New task ids become PENDING in input order; known or repeated ids are duplicates."""
    meta = tx.run_meta()
    known = tx.prompts([task.task_id for task in tasks])
    fresh: dict[str, PromptTask] = {}
    duplicates: list[str] = []
    for task in tasks:
        if task.task_id in known or task.task_id in fresh:
            duplicates.append(task.task_id)
        else:
            fresh[task.task_id] = task
    if fresh:
        rows = [
            PromptRow(tid, meta.next_prompt_seq + i, PENDING, task.attempt)
            for i, (tid, task) in enumerate(fresh.items())
        ]
        tx.insert_prompts(rows, list(fresh.values()))
        tx.add_counters({prompt_counter(PENDING): len(rows)})
        tx.set_meta(meta.changes(next_prompt_seq=meta.next_prompt_seq + len(rows))[1])
    return CommitResult(committed=tuple(fresh), duplicates=tuple(duplicates))


def lease_prompts(
    tx: LedgerTx, worker: str, limit: int, lease_s: float, now: float, max_attempts: int
) -> list[PromptTask]:
    """Expire overdue leases, then lease up to ``limit`` PENDING tasks FIFO to ``worker``."""
    changes = _Changes(tx.run_meta())
    requeued = []
    for row in tx.prompts_in(LEASED):
        if row.deadline <= now:
            new = changes.retry(row, "lease expired", max_attempts)
            if new.state is PENDING:
                requeued.append(new)
    if limit == 0:
        changes.write(tx)
        return []
    chosen = (tx.prompts_in(PENDING, limit=limit) + requeued)[:limit]
    leased = [
        changes.set(row, row._replace(state=LEASED, worker=worker, deadline=now + lease_s))
        for row in chosen
    ]
    tasks = tx.tasks([row.task_id for row in leased])
    changes.write(tx)
    return [dataclasses.replace(tasks[row.task_id], attempt=row.attempt) for row in leased]


def _leased_row(tx: LedgerTx, operation: str, task_id: str, worker: str) -> PromptRow | None:
    """The row if LEASED by ``worker``; None if already DONE; otherwise a conflict."""
    row = tx.prompts([task_id]).get(task_id)
    if row is None:
        raise conflict(operation, [f"unknown task id {task_id!r}"])
    if row.state is DONE:
        return None
    if row.state is LEASED and row.worker == worker:
        return row
    if row.state is LEASED:
        problem = f"task {task_id!r} is leased by worker {row.worker!r}, not {worker!r}"
    elif row.state is PENDING:
        problem = f"task {task_id!r} is pending (its lease expired or was reclaimed)"
    else:
        problem = f"task {task_id!r} already failed ({row.reason})"
    raise conflict(operation, [problem])


def complete_prompt(tx: LedgerTx, task_id: str, worker: str) -> PromptState:
    """LEASED by ``worker`` → DONE; a task already DONE stays DONE."""
    row = _leased_row(tx, "complete_prompt", task_id, worker)
    if row is not None:
        changes = _Changes(tx.run_meta())
        changes.set(row, row._replace(state=DONE))
        changes.write(tx)
    return DONE


def fail_prompt(
    tx: LedgerTx, task_id: str, worker: str, reason: str, retryable: bool, max_attempts: int
) -> PromptState:
    """LEASED by ``worker`` → PENDING (retryable, attempts left) or FAILED(reason)."""
    row = _leased_row(tx, "fail_prompt", task_id, worker)
    if row is None:
        raise conflict("fail_prompt", [f"task {task_id!r} is already done"])
    changes = _Changes(tx.run_meta())
    if retryable:
        new = changes.retry(row, reason, max_attempts)
    else:
        new = changes.set(row, row._replace(state=FAILED, worker="", deadline=0.0, reason=reason))
    changes.write(tx)
    return new.state


def reclaim_leases(tx: LedgerTx, worker: str, max_attempts: int) -> list[str]:
    """Every lease of ``worker`` goes back as if it expired now; returns those task ids."""
    changes = _Changes(tx.run_meta())
    reclaimed = []
    for row in tx.prompts_in(LEASED):
        if row.worker == worker:
            changes.retry(row, "lease reclaimed", max_attempts)
            reclaimed.append(row.task_id)
    changes.write(tx)
    return reclaimed
