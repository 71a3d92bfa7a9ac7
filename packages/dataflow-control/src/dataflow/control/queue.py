"""RankQueue: one data-parallel rank's blocking stream of refs, read from the ledger.

It polls the ledger (with backoff), so it works the same in the dispatcher's process and in any
other process or host sharing the ledger. End of stream is read from the ledger's run markers,
never inferred from silence: the queue ends only when the producer is CLOSED, the backlog is
empty and every ref assigned to this rank was handed out; a FAILED producer (or consumer) is an
error, never an end.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from dataflow.contracts.errors import ClosedError, RunFailedError
from dataflow.contracts.features import SampleRef
from dataflow.contracts.protocols import Ledger
from dataflow.contracts.states import ConsumerState, LedgerStatus, ProducerState
from dataflow.control._validate import non_negative_int, optional_timeout
from dataflow.control.dispatch import Dispatcher


class RankQueue:
    """The contracts' ``RefQueue`` for one rank: refs in window order, each handed out once.

    ``get`` returns the next ref assigned to this rank; ``None`` only at a clean end of stream;
    raises ``RunFailedError`` when the producer or the consumer side failed (with its reason),
    ``TimeoutError`` when ``timeout`` (or else the queue's ``idle_timeout_s``) passes with
    nothing to return, ``ClosedError`` after ``close``. Not shared between threads: one reader.
    Create it after any restart reconciliation (a reconciled run re-cuts its windows).
    """

    def __init__(
        self,
        ledger: Ledger,
        rank: int,
        *,
        dispatcher: Dispatcher | None = None,
        idle_timeout_s: float | None = None,
        poll_s: float = 0.002,
        max_poll_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._ledger = ledger
        self.rank = non_negative_int("RankQueue", "rank", rank)
        self._dispatcher = dispatcher
        self._idle_timeout_s = optional_timeout("RankQueue", idle_timeout_s)
        self._poll_s = poll_s
        self._max_poll_s = max_poll_s
        self._clock = clock
        self._sleep = sleep
        self._buffer: deque[SampleRef] = deque()
        self._seen: set[str] = set()  # handed out or buffered, still ASSIGNED in the ledger
        self._ended = False
        self._closed = False
        self.handed_out = 0

    def get(self, timeout: float | None = None) -> SampleRef | None:
        if self._closed:
            raise ClosedError(f"RankQueue of rank {self.rank} is closed")
        limit = optional_timeout("RankQueue.get", timeout)
        if limit is None:
            limit = self._idle_timeout_s
        if not self._buffer and not self._ended:
            self._fill(limit)
        if self._buffer:
            self.handed_out += 1
            return self._buffer.popleft()
        return None

    def close(self) -> None:
        """Stop handing out refs; refs not handed out stay ASSIGNED in the ledger."""
        self._closed = True
        self._buffer.clear()

    def _fill(self, limit: float | None) -> None:
        deadline = None if limit is None else self._clock() + limit
        delay = self._poll_s
        while True:
            if self._dispatcher is not None:
                self._dispatcher.pump()
            status = self._ledger.status()
            self._raise_if_failed(status)
            # assigned() is read after status(): once the status shows the producer CLOSED
            # and an empty backlog, no window can open later, so nothing is missed.
            if self._take_new():
                return
            if status.markers.producer == ProducerState.CLOSED and status.backlog == 0:
                self._ended = True
                return
            now = self._clock()
            if deadline is not None and now >= deadline:
                raise TimeoutError(
                    f"RankQueue of rank {self.rank}: nothing to hand out within {limit}s "
                    f"(producer {status.markers.producer.value}, backlog {status.backlog})"
                )
            self._sleep(delay if deadline is None else min(delay, deadline - now))
            delay = min(delay * 2, self._max_poll_s)

    def _raise_if_failed(self, status: LedgerStatus) -> None:
        markers = status.markers
        if markers.producer == ProducerState.FAILED:
            raise RunFailedError(
                f"the producer failed ({markers.producer_reason or 'no reason given'}); "
                "the stream did not end cleanly"
            )
        if markers.consumer == ConsumerState.FAILED:
            raise RunFailedError(
                f"the consumer side failed ({markers.consumer_reason or 'no reason given'})"
            )

    def _take_new(self) -> bool:
        assigned = self._ledger.assigned(self.rank)
        self._seen &= {ref.sample_id for ref in assigned}  # acked refs leave ASSIGNED
        new = [ref for ref in assigned if ref.sample_id not in self._seen]
        self._seen.update(ref.sample_id for ref in new)
        self._buffer.extend(new)
        return bool(new)
