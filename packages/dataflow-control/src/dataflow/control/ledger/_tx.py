"""What a ledger backend provides: atomic transactions over a few primitive reads and writes
of the rows it stores per sample and per prompt.

The rules of the ledger live once, in the operations of ``_samples``, ``_prompts`` and
``_run``; a backend only stores. Every operation runs inside ``LedgerStorage.write`` (or
``read``) and follows one pattern: read what it needs, validate, then write. Operations never
read back their own writes, so a backend may buffer writes until the transaction ends (Redis
does: MULTI/EXEC), and a refused operation has written nothing.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, TypeVar

from dataflow.contracts.features import SampleRef
from dataflow.contracts.prompt import PromptTask
from dataflow.contracts.states import PromptState, SampleState
from dataflow.contracts.weights import WeightVersion
from dataflow.control.ledger._meta import RunMeta

R = TypeVar("R")


# The rows a backend stores per sample and per prompt (the records stay separate).
class SampleRow(NamedTuple):
    """Where one sample is: its commit order (``seq``), state and the state's arguments.

    ``rank``/``window`` are set while ASSIGNED (and kept after), ``step`` once TRAINED,
    ``reason`` once DROPPED; -1 / "" otherwise. ``nbytes`` is the ref's estimated size.
    """

    sample_id: str
    seq: int
    state: SampleState
    rank: int = -1
    window: int = -1
    step: int = -1
    reason: str = ""
    nbytes: int = 0


class PromptRow(NamedTuple):
    """Where one prompt task is: FIFO order (``seq``), state, attempt, lease and failure."""

    task_id: str
    seq: int
    state: PromptState
    attempt: int = 0
    worker: str = ""
    deadline: float = 0.0
    reason: str = ""


SampleChange = tuple[SampleState, SampleRow]
"""A sample row's previous state and its new row (backends keep per-state indexes)."""

PromptChange = tuple[PromptState, PromptRow]
"""A prompt row's previous state and its new row."""


class LedgerTx(abc.ABC):
    """One transaction's view of a ledger backend (valid only inside ``write``/``read``)."""

    # -- reads ---------------------------------------------------------------------------
    @abc.abstractmethod
    def meta(self) -> dict[str, str]:
        """The run-level key/value markers (small, fixed set of keys)."""

    def run_meta(self) -> RunMeta:
        """The markers of ``meta()`` parsed; a backend may keep them between transactions
        as long as it returns exactly what ``meta()`` holds now.
        """
        return RunMeta.load(self.meta())

    stores_next_seq: bool = True
    """Whether ``commit`` must write the ``next_seq`` marker; False where ``commit_reads``
    derives the next commit order from the stored rows instead (one write fewer per commit).
    """

    def commit_reads(
        self, sample_ids: Sequence[str], task_ids: Sequence[str], meta: RunMeta
    ) -> tuple[dict[str, SampleRow], dict[str, PromptRow], int]:
        """What a commit reads: the rows of the known ids among ``sample_ids`` and among
        ``task_ids``, and the commit order the next new sample gets (never below
        ``meta.next_seq``, above every stored seq). A backend may answer in one round trip.
        """
        return self.samples(sample_ids), self.prompts(task_ids) if task_ids else {}, meta.next_seq

    @abc.abstractmethod
    def counters(self) -> dict[str, int]:
        """Every counter kept beside the transitions (per-state counts, bytes, drop reasons)."""

    @abc.abstractmethod
    def samples(self, sample_ids: Sequence[str]) -> dict[str, SampleRow]:
        """The rows of the known ids among ``sample_ids``."""

    @abc.abstractmethod
    def samples_in(self, state: SampleState, limit: int | None = None) -> list[SampleRow]:
        """Rows in ``state`` in commit order, at most ``limit``; never used for terminal states."""

    @abc.abstractmethod
    def assigned_rows(self, rank: int, after_window: int) -> list[SampleRow]:
        """ASSIGNED rows of ``rank`` in windows after ``after_window``, by window then seq."""

    def assign_oldest(self, quantum: int, per_rank: int, window_id: int) -> list[str] | None:
        """Make the oldest ``quantum`` COMMITTED samples ASSIGNED in window ``window_id``, the
        i-th in commit order to rank ``i // per_rank``, and return their ids in that order; or
        write nothing and return None when fewer than ``quantum`` are COMMITTED. The state
        counters are the caller's to write. A backend may do it without reading the rows.
        """
        rows = self.samples_in(SampleState.COMMITTED, limit=quantum)
        if len(rows) < quantum:
            return None
        # Rows built directly (not ``_replace``, which is several times slower per row).
        changes: list[SampleChange] = [
            (
                SampleState.COMMITTED,
                SampleRow(
                    sid, seq, SampleState.ASSIGNED, i // per_rank, window_id, step, why, size
                ),
            )
            for i, (sid, seq, _, _, _, step, why, size) in enumerate(rows)
        ]
        self.update_samples(changes)
        return [row.sample_id for row in rows]

    def assigned_refs(self, rank: int, after_window: int) -> list[SampleRef]:
        """The refs of ``assigned_rows(rank, after_window)``, in that order (a backend may read
        them with the rows).
        """
        rows = self.assigned_rows(rank, after_window)
        refs = self.refs([row.sample_id for row in rows])
        return [refs[row.sample_id] for row in rows]

    @abc.abstractmethod
    def refs(self, sample_ids: Sequence[str]) -> dict[str, SampleRef]:
        """The committed refs of the known ids among ``sample_ids``."""

    @abc.abstractmethod
    def prompts(self, task_ids: Sequence[str]) -> dict[str, PromptRow]:
        """The rows of the known task ids among ``task_ids``."""

    @abc.abstractmethod
    def prompts_in(self, state: PromptState, limit: int | None = None) -> list[PromptRow]:
        """Rows in ``state`` (PENDING or LEASED) in FIFO order, at most ``limit``."""

    @abc.abstractmethod
    def tasks(self, task_ids: Sequence[str]) -> dict[str, PromptTask]:
        """The tasks as added, by id."""

    @abc.abstractmethod
    def weights(self) -> list[WeightVersion]:
        """Published weight versions in publish order."""

    # -- writes (may be buffered until the transaction commits) --------------------------
    @abc.abstractmethod
    def set_meta(self, values: Mapping[str, str]) -> None: ...

    @abc.abstractmethod
    def add_counters(self, deltas: Mapping[str, int]) -> None: ...

    @abc.abstractmethod
    def insert_samples(self, rows: Sequence[SampleRow], refs: Sequence[SampleRef]) -> None: ...

    @abc.abstractmethod
    def update_samples(self, changes: Sequence[SampleChange]) -> None: ...

    @abc.abstractmethod
    def insert_prompts(self, rows: Sequence[PromptRow], tasks: Sequence[PromptTask]) -> None: ...

    @abc.abstractmethod
    def update_prompts(self, changes: Sequence[PromptChange]) -> None: ...

    @abc.abstractmethod
    def append_weight(self, version: WeightVersion) -> None: ...


class LedgerStorage(abc.ABC):
    """A backend: runs operations as atomic transactions and says what it is."""

    backend: str
    durable: bool

    @abc.abstractmethod
    def write(self, operation: Callable[[LedgerTx], R]) -> R:
        """Run ``operation`` as one serialisable read-write transaction; all or nothing.

        If ``operation`` raises, nothing it wrote is kept and the error propagates.
        """

    @abc.abstractmethod
    def read(self, operation: Callable[[LedgerTx], R]) -> R:
        """Run a read-only ``operation`` against one consistent snapshot."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; later calls raise ``ClosedError``."""
