"""run_interleaved: the producer on a background thread, the trainer on the calling thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from dataflow.contracts.checks import is_number
from dataflow.contracts.errors import InvalidInputError
from dataflow.contracts.protocols import RefQueue
from dataflow.launch.interleave.guard import GuardedQueue
from dataflow.launch.interleave.producer_thread import ProducerThread

R = TypeVar("R")
P = TypeVar("P")


@dataclass(frozen=True)
class InterleaveOutcome(Generic[R, P]):
    """How an interleaved run ended when nothing failed.

    ``trained`` is what the trainer returned and ``produced`` what the producer returned.
    ``producer_finished`` is True when the producer returned on its own before it was asked to
    stop (it ended its stream; the trainer drained the tail), False when it returned after the
    stop request that followed the trainer's return (it was wound down cooperatively).
    """

    trained: R
    produced: P | None
    producer_finished: bool


def run_interleaved(
    producer: Callable[[threading.Event], P],
    trainer: Callable[[RefQueue], R],
    queue: RefQueue,
    *,
    stop_timeout_s: float = 30.0,
    poll_s: float = 0.05,
    idle_timeout_s: float | None = None,
    on_stop: Callable[[], None] | None = None,
    name: str = "dataflow-producer",
) -> InterleaveOutcome[R, P]:
    """Run ``producer(stop_event)`` on a daemon thread and ``trainer(refs)`` on this thread.

    ``queue`` is the hand-off: the producer feeds it (commits to the ledger behind a rank
    queue) and ends its stream before returning; the trainer
    reads it through ``refs``, a ``RefQueue`` over ``queue`` that also watches the producer.

    Shutdown paths (each joins the producer thread before returning or raising):
    - the trainer returns first (e.g. its step budget is reached): the stop event is set,
      ``on_stop`` is called (for producers with their own stop, e.g. ``RolloutProducer.stop``),
      ``queue`` is closed, and the producer
      gets ``stop_timeout_s`` to return; if it does not, ``ProducerStuckError`` says where it
      is stuck (a thread cannot be killed; it is a daemon, so it cannot hold the process);
    - the producer returns first: the trainer keeps reading, drains the tail and reads the
      clean end of stream (``None``) the producer left in ``queue``;
    - the producer raises: the trainer's next or pending ``get`` raises ``RunFailedError``
      within about ``poll_s`` (not after an idle timeout), and the producer's own exception is
      re-raised here, its traceback reaching into the producer thread.

    When several things fail, one exception is raised and the others are attached to it as
    notes (``__notes__``), the first of them also as ``__context__``. Precedence: a
    ``KeyboardInterrupt`` in the trainer (the producer is stopped too; Ctrl-C stays Ctrl-C),
    then the producer's exception, then the trainer's exception, then a failure to stop the
    producer (``ProducerStuckError``, or an error from ``on_stop``/``queue.close``). So a
    trainer error never masks a producer error (a producer failure is often the cause of a
    trainer failure, never the other way round), and a stuck producer is always reported,
    raised on its own when nothing else failed. A trainer error caused by the producer's
    failure (the ``RunFailedError`` its ``get`` raised, or an error chained to it) is not
    reported twice.
    A second Ctrl-C while the producer winds down propagates at once (its stop event is set).

    ``idle_timeout_s`` bounds each ``get(timeout=None)`` of the trainer (None: no bound; the
    trainer waits until a ref, the end of stream or a failure arrives). Bad arguments raise ``InvalidInputError`` before any thread starts.
    """
    _check_arguments(
        producer, trainer, queue, stop_timeout_s, poll_s, idle_timeout_s, on_stop, name
    )
    thread: ProducerThread[P] = ProducerThread(producer, name)
    refs = GuardedQueue(queue, thread, poll_s=poll_s, idle_timeout_s=idle_timeout_s)
    thread.start()
    trainer_error: BaseException | None = None
    trained: R | None = None
    try:
        trained = trainer(refs)
    except BaseException as exc:  # settled below, after the producer is stopped
        trainer_error = exc
    stop_actions = [on_stop] if on_stop is not None else []
    stop_errors = thread.wind_down(stop_timeout_s, [*stop_actions, refs.close])
    failures = _rank(trainer_error, thread.error, stop_errors, refs.raised)
    if failures:
        raise _combine(failures)
    return InterleaveOutcome(cast(R, trained), thread.result, thread.finished_first)


def _rank(
    trainer_error: BaseException | None,
    producer_error: BaseException | None,
    stop_errors: list[BaseException],
    from_queue: BaseException | None,
) -> list[tuple[str, BaseException]]:
    """The failures to report, most important first, each with the role it played."""
    ranked: list[tuple[str, BaseException]] = []
    interrupted = isinstance(trainer_error, KeyboardInterrupt)
    if interrupted and trainer_error is not None:
        ranked.append(("the trainer was interrupted", trainer_error))
    if producer_error is not None:
        ranked.append(("the producer failed", producer_error))
    consequence = (
        producer_error is not None
        and from_queue is not None
        and trainer_error is not None
        and from_queue in _chain(trainer_error)
    )
    if trainer_error is not None and not interrupted and not consequence:
        ranked.append(("the trainer failed", trainer_error))
    ranked.extend(("stopping the producer failed", error) for error in stop_errors)
    return ranked


def _combine(failures: list[tuple[str, BaseException]]) -> BaseException:
    """The first failure, carrying the others as notes (and the first other as context)."""
    _, primary = failures[0]
    others = [(role, error) for role, error in failures[1:] if error is not primary]
    for role, error in others:
        primary.add_note(f"{role} too: {type(error).__name__}: {error}")
    if others and primary.__context__ is None:
        _, first = others[0]
        if primary not in _chain(first):  # never build a cycle of contexts
            primary.__context__ = first
    return primary


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and every exception it was raised from or during, without looping."""
    seen: list[BaseException] = []
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        pending.extend((current.__cause__, current.__context__))
    return seen


def _check_arguments(
    producer: object,
    trainer: object,
    queue: object,
    stop_timeout_s: object,
    poll_s: object,
    idle_timeout_s: object,
    on_stop: object,
    name: object,
) -> None:
    for label, value in (("producer", producer), ("trainer", trainer)):
        if not callable(value):
            raise InvalidInputError(f"run_interleaved: {label} must be callable, got {value!r}")
    if on_stop is not None and not callable(on_stop):
        raise InvalidInputError(f"run_interleaved: on_stop must be callable, got {on_stop!r}")
    if not isinstance(queue, RefQueue):
        raise InvalidInputError(
            f"run_interleaved: queue must be a RefQueue (get/close), got {type(queue).__name__}"
        )
    for label, value, optional in (
        ("stop_timeout_s", stop_timeout_s, False),
        ("poll_s", poll_s, False),
        ("idle_timeout_s", idle_timeout_s, True),
    ):
        if value is None and optional:
            continue
        if not is_number(value) or value <= 0:
            raise InvalidInputError(f"run_interleaved: {label} must be a number > 0, got {value!r}")
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"run_interleaved: name must be a non-empty str, got {name!r}")
