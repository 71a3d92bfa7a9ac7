"""ProducerThread: the producer callable on a background thread, with a cooperative stop."""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from dataflow.contracts.errors import RunFailedError

P = TypeVar("P")


class ProducerStuckError(RunFailedError):
    """The producer did not return within the stop timeout after it was asked to stop.

    Python cannot kill a thread: the producer is left on a daemon thread (it cannot keep the
    process alive) and this error names it and where it is stuck, so the caller can fail the run
    instead of silently leaving it running. ``thread_name`` is the stuck thread's name.
    """

    def __init__(self, message: str, thread_name: str) -> None:
        super().__init__(message)
        self.thread_name = thread_name


class ProducerThread(Generic[P]):
    """Runs ``produce(stop_event)`` once on a daemon thread and records how it ended.

    Guarantees: the thread never lets an exception escape (so nothing is printed behind the
    caller's back); whatever the producer raises, ``BaseException`` included, is kept in
    ``error`` with its traceback, and ``failed`` is set the moment it is kept, so a waiting
    consumer can react at once. ``finished_first`` tells whether the producer returned before
    anyone asked it to stop. ``wind_down`` asks it to stop and joins it for a bounded time.
    """

    def __init__(self, produce: Callable[[threading.Event], P], name: str) -> None:
        self._produce = produce
        self.stop_event = threading.Event()
        self.failed = threading.Event()
        self.error: BaseException | None = None
        self.result: P | None = None
        self.finished_first = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def name(self) -> str:
        """The thread's name."""
        return self._thread.name

    def start(self) -> None:
        """Start the producer thread."""
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._produce(self.stop_event)
        except BaseException as exc:  # kept for the caller's thread, which re-raises it
            self.error = exc
            self.failed.set()
        else:
            self.finished_first = not self.stop_event.is_set()

    def wind_down(
        self, timeout_s: float, actions: Sequence[Callable[[], None]]
    ) -> list[BaseException]:
        """Set the stop event, run each of ``actions``, join the thread for up to ``timeout_s``.

        Returns what went wrong, in order: the exceptions the actions raised (every action runs
        and the thread is joined regardless), then a ``ProducerStuckError`` if the thread is
        still running after the join.
        """
        self.stop_event.set()
        errors: list[BaseException] = []
        for action in actions:
            try:
                action()
            except Exception as exc:
                errors.append(exc)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            errors.append(
                ProducerStuckError(
                    f"the producer thread {self.name!r} did not stop within {timeout_s:g}s of "
                    f"the stop request; it is still running {self._where()}",
                    self.name,
                )
            )
        return errors

    def _where(self) -> str:
        frame = sys._current_frames().get(self._thread.ident or -1)
        if frame is None:
            return "(location unknown)"
        innermost = traceback.extract_stack(frame)[-1]
        return f"in {innermost.name}() at {innermost.filename}:{innermost.lineno}"
