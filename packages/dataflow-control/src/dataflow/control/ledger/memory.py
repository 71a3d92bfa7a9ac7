"""``memory://``: the ledger in process memory, for tests and single-process runs.

Not durable (``durable=False``): everything is lost with the process. Ledgers opened with the
same ``memory://name`` in one process share one store, like files on disk would; an unnamed
``memory://`` is private to its ledger. Transactions are serialised by one lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from dataflow.contracts.errors import ClosedError
from dataflow.contracts.features import SampleRef
from dataflow.contracts.prompt import PromptTask
from dataflow.contracts.states import PromptState, SampleState
from dataflow.contracts.weights import WeightVersion
from dataflow.control.ledger._tx import (
    LedgerStorage,
    LedgerTx,
    PromptChange,
    PromptRow,
    SampleChange,
    SampleRow,
)

R = TypeVar("R")


class _MemoryState:
    """All rows of one in-memory ledger, with per-state indexes of the live states."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.meta: dict[str, str] = {}
        self.counters: dict[str, int] = {}
        self.samples: dict[str, SampleRow] = {}
        self.refs: dict[str, SampleRef] = {}
        self.sample_index: dict[SampleState, dict[str, None]] = {
            SampleState.COMMITTED: {},
            SampleState.ASSIGNED: {},
            SampleState.TRAINED: {},
        }
        self.prompts: dict[str, PromptRow] = {}
        self.tasks: dict[str, PromptTask] = {}
        self.prompt_index: dict[PromptState, dict[str, None]] = {
            PromptState.PENDING: {},
            PromptState.LEASED: {},
        }
        self.weights: list[WeightVersion] = []


class _MemoryTx(LedgerTx):
    def __init__(self, state: _MemoryState) -> None:
        self._s = state

    def meta(self) -> dict[str, str]:
        return dict(self._s.meta)

    def counters(self) -> dict[str, int]:
        return dict(self._s.counters)

    def samples(self, sample_ids: Sequence[str]) -> dict[str, SampleRow]:
        rows = self._s.samples
        return {sid: rows[sid] for sid in sample_ids if sid in rows}

    def samples_in(self, state: SampleState, limit: int | None = None) -> list[SampleRow]:
        rows = sorted((self._s.samples[sid] for sid in self._s.sample_index[state]), key=_seq)
        return rows if limit is None else rows[:limit]

    def assigned_rows(self, rank: int, after_window: int) -> list[SampleRow]:
        rows = self._s.samples
        found = [rows[sid] for sid in self._s.sample_index[SampleState.ASSIGNED]]
        found = [row for row in found if row.rank == rank and row.window > after_window]
        return sorted(found, key=lambda row: (row.window, row.seq))

    def refs(self, sample_ids: Sequence[str]) -> dict[str, SampleRef]:
        refs = self._s.refs
        return {sid: refs[sid] for sid in sample_ids if sid in refs}

    def prompts(self, task_ids: Sequence[str]) -> dict[str, PromptRow]:
        rows = self._s.prompts
        return {tid: rows[tid] for tid in task_ids if tid in rows}

    def prompts_in(self, state: PromptState, limit: int | None = None) -> list[PromptRow]:
        rows = sorted((self._s.prompts[tid] for tid in self._s.prompt_index[state]), key=_seq)
        return rows if limit is None else rows[:limit]

    def tasks(self, task_ids: Sequence[str]) -> dict[str, PromptTask]:
        return {tid: self._s.tasks[tid] for tid in task_ids if tid in self._s.tasks}

    def weights(self) -> list[WeightVersion]:
        return list(self._s.weights)

    def set_meta(self, values: Mapping[str, str]) -> None:
        self._s.meta.update(values)

    def add_counters(self, deltas: Mapping[str, int]) -> None:
        counters = self._s.counters
        for name, delta in deltas.items():
            counters[name] = counters.get(name, 0) + delta

    def insert_samples(self, rows: Sequence[SampleRow], refs: Sequence[SampleRef]) -> None:
        for row, ref in zip(rows, refs, strict=True):
            self._s.samples[row.sample_id] = row
            self._s.refs[row.sample_id] = ref
            self._s.sample_index[row.state][row.sample_id] = None

    def update_samples(self, changes: Sequence[SampleChange]) -> None:
        index = self._s.sample_index
        for old, row in changes:
            self._s.samples[row.sample_id] = row
            if old in index:
                index[old].pop(row.sample_id, None)
            if row.state in index:
                index[row.state][row.sample_id] = None

    def insert_prompts(self, rows: Sequence[PromptRow], tasks: Sequence[PromptTask]) -> None:
        for row, task in zip(rows, tasks, strict=True):
            self._s.prompts[row.task_id] = row
            self._s.tasks[row.task_id] = task
            self._s.prompt_index[row.state][row.task_id] = None

    def update_prompts(self, changes: Sequence[PromptChange]) -> None:
        index = self._s.prompt_index
        for old, row in changes:
            self._s.prompts[row.task_id] = row
            if old in index:
                index[old].pop(row.task_id, None)
            if row.state in index:
                index[row.state][row.task_id] = None

    def append_weight(self, version: WeightVersion) -> None:
        self._s.weights.append(version)


def _seq(row: SampleRow | PromptRow) -> int:
    return row.seq


_NAMED: dict[str, _MemoryState] = {}
_NAMED_LOCK = threading.Lock()


class MemoryStorage(LedgerStorage):
    """In-process storage; a refused operation writes nothing (rules validate before writing)."""

    backend = "memory"
    durable = False

    def __init__(self, name: str = "") -> None:
        if name:
            with _NAMED_LOCK:
                self._state = _NAMED.setdefault(name, _MemoryState())
        else:
            self._state = _MemoryState()
        self._closed = False

    def _run(self, operation: Callable[[LedgerTx], R]) -> R:
        if self._closed:
            raise ClosedError("this memory:// ledger is closed")
        with self._state.lock:
            return operation(_MemoryTx(self._state))

    def write(self, operation: Callable[[LedgerTx], R]) -> R:
        return self._run(operation)

    def read(self, operation: Callable[[LedgerTx], R]) -> R:
        return self._run(operation)

    def close(self) -> None:
        self._closed = True
