"""Window-aligned dispatch: cutting the ledger's backlog into whole optimizer windows.

One dispatcher per run (on data-parallel rank 0) writes windows; every rank's queue reads its
own share. A window opens only when a whole quantum is committed (the ledger's
``assign_window`` guarantees it), so the stream always ends on a window boundary: once the
producer is CLOSED, the remainder of fewer than a quantum is DROPPED(``partial_window``) and its
features aborted.
"""

from __future__ import annotations

import math
import threading

from dataflow.contracts.protocols import Ledger, SampleAborter
from dataflow.contracts.states import ProducerState
from dataflow.control._abort import abort_features
from dataflow.control._validate import positive_int
from dataflow.control.gate import StalenessGate
from dataflow.control.ledger import PARTIAL_WINDOW
from dataflow.control.window import WindowShape


class Dispatcher:
    """Opens optimizer windows from the backlog, at most ``lookahead`` unacked at a time.

    Guarantees: every window holds exactly one quantum (``shape.per_rank`` per rank); with a
    staleness gate the quantum at the head of the backlog is screened first and a window is cut
    only from samples that passed it; at end of stream the sub-quantum tail is DROPPED with
    reason ``partial_window`` and its features aborted. Thread-safe; ``pump`` never blocks.
    """

    def __init__(
        self,
        ledger: Ledger,
        shape: WindowShape,
        *,
        rank: int = 0,
        gate: StalenessGate | None = None,
        aborter: SampleAborter | None = None,
        lookahead: int = 2,
    ) -> None:
        self._ledger = ledger
        self.shape = shape
        self._rank = rank
        self._gate = gate
        self._aborter = aborter
        self._lookahead = positive_int("Dispatcher", "lookahead", lookahead)
        self._lock = threading.Lock()
        self.windows_opened = 0
        self.tail_dropped = 0

    def pump(self) -> int:
        """Open every window that can be opened now; drop the tail at end of stream.

        Returns the number of windows opened. Does nothing once the producer has FAILED (the
        queues raise instead).
        """
        with self._lock:
            producer = self._ledger.markers().producer
            if producer == ProducerState.FAILED:
                return 0
            opened = 0
            open_windows = math.ceil(len(self._ledger.assigned(self._rank)) / self.shape.per_rank)
            while open_windows < self._lookahead and self._head_is_fresh():
                window = self._ledger.assign_window(self.shape.dp_size, self.shape.per_rank)
                if window is None:
                    break
                opened += 1
                open_windows += 1
            self.windows_opened += opened
            if producer == ProducerState.CLOSED:
                self._drop_tail()
            return opened

    def _head_is_fresh(self) -> bool:
        """Screen the next quantum until it is all fresh (True) or too short (False)."""
        if self._gate is None:
            return True
        quantum = self.shape.quantum
        while True:
            head = self._ledger.committed(quantum)
            if len(head) < quantum:
                return False
            fresh = self._gate.screen(head)
            if len(fresh) == quantum:
                self._gate.record_passed(fresh)
                return True

    def _drop_tail(self) -> None:
        backlog = self._ledger.status().backlog
        if not 0 < backlog < self.shape.quantum:
            return
        # Free first, then drop: a crash in between leaves the tail COMMITTED, and the next
        # dispatcher frees it again (idempotently) and drops it — nothing leaks.
        tail = [ref.sample_id for ref in self._ledger.committed(self.shape.quantum)]
        abort_features(self._aborter, tail, PARTIAL_WINDOW)
        dropped = self._ledger.drop_partial_tail()
        self.tail_dropped += len(dropped)
        freed = set(tail)
        late = [ref.sample_id for ref in dropped if ref.sample_id not in freed]
        abort_features(self._aborter, late, PARTIAL_WINDOW)
