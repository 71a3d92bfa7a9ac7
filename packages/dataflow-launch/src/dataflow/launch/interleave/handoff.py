"""HandoffQueue: a bounded in-process hand-off of refs from one producer to one trainer."""

from __future__ import annotations

import threading
import time
from collections import deque

from dataflow.contracts import is_int, is_number
from dataflow.contracts.errors import ClosedError, InvalidInputError, RunFailedError
from dataflow.contracts.features import SampleRef


def _deadline(owner: str, timeout: object) -> float | None:
    if timeout is None:
        return None
    if not is_number(timeout) or timeout < 0:
        raise InvalidInputError(f"{owner}: timeout must be None or a number >= 0, got {timeout!r}")
    return time.monotonic() + timeout


class HandoffQueue:
    """A bounded, thread-safe FIFO of refs; the contracts' ``RefQueue`` on the trainer's end.

    For one-process runs whose ledger retains nothing (``noop://``), where the ledger's rank
    queue has nothing to read. Guarantees:

    Producer end:
    - ``put(ref, timeout=None)`` queues ``ref`` and returns True, blocking while ``capacity``
      refs wait; returns False and queues nothing once the trainer closed the queue (the
      consumer is gone: stop producing); raises ``TimeoutError`` (nothing queued) when no room
      frees within ``timeout``, ``ClosedError`` after ``finish``/``fail`` and
      ``InvalidInputError`` for anything but a ``SampleRef``;
    - ``finish()`` ends the stream cleanly; ``fail(reason)`` ends it as a failure. The first
      of them wins; a failure never turns into a clean end.

    Trainer end (``RefQueue``):
    - ``get(timeout=None)`` returns refs in ``put`` order; ``None`` once finished and drained;
      raises ``RunFailedError`` (with the reason) as soon as the stream failed, buffered refs
      or not; ``TimeoutError`` after ``timeout`` seconds with nothing to return;
      ``ClosedError`` after ``close``;
    - ``close()`` drops what is buffered and wakes a blocked ``put`` (which returns False).
    """

    def __init__(self, capacity: int) -> None:
        if not is_int(capacity) or capacity < 1:
            raise InvalidInputError(f"HandoffQueue: capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self._refs: deque[SampleRef] = deque()
        self._cond = threading.Condition()
        self._finished = False
        self._failure: str | None = None
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._refs)

    # -- producer end ------------------------------------------------------------------------

    def put(self, ref: SampleRef, timeout: float | None = None) -> bool:
        if not isinstance(ref, SampleRef):
            raise InvalidInputError(f"HandoffQueue.put takes a SampleRef, got {type(ref).__name__}")
        deadline = _deadline("HandoffQueue.put", timeout)
        with self._cond:
            while True:
                if self._closed:
                    return False
                self._check_open_stream()
                if len(self._refs) < self.capacity:
                    self._refs.append(ref)
                    self._cond.notify_all()
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"HandoffQueue: no room within {timeout:g}s ({self.capacity} refs wait)"
                    )
                self._cond.wait(remaining)

    def finish(self) -> None:
        """End the stream cleanly: the trainer drains what is queued, then reads ``None``."""
        with self._cond:
            if self._failure is None:
                self._finished = True
            self._cond.notify_all()

    def fail(self, reason: str) -> None:
        """End the stream as a failure: the trainer's next ``get`` raises ``RunFailedError``."""
        if not isinstance(reason, str) or not reason:
            raise InvalidInputError("HandoffQueue.fail needs a non-empty reason")
        with self._cond:
            if not self._finished and self._failure is None:
                self._failure = reason
            self._cond.notify_all()

    def _check_open_stream(self) -> None:
        if self._failure is not None:
            raise ClosedError(f"HandoffQueue: the stream already failed ({self._failure})")
        if self._finished:
            raise ClosedError("HandoffQueue: the stream already finished")

    # -- trainer end -------------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> SampleRef | None:
        deadline = _deadline("HandoffQueue.get", timeout)
        with self._cond:
            while True:
                if self._closed:
                    raise ClosedError("HandoffQueue is closed")
                if self._failure is not None:
                    raise RunFailedError(
                        f"the producer failed ({self._failure}); the stream did not end cleanly"
                    )
                if self._refs:
                    ref = self._refs.popleft()
                    self._cond.notify_all()
                    return ref
                if self._finished:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"HandoffQueue: no ref within {timeout:g}s")
                self._cond.wait(remaining)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._refs.clear()
            self._cond.notify_all()
