"""The interleaved loop's shutdown paths, with real threads over real hand-offs.

Each scenario runs on a watchdog thread (pytest has no timeout plugin here): a hang fails the
test instead of blocking the suite. Every test asserts the live threads return to their
baseline, and the exact exception raised.

The hand-off is the one colocated online runs on: the control plane's own rank queue over a
real ``memory://`` ledger (the producer commits through the controller's producer side, with
flow control).
"""

from __future__ import annotations

import itertools
import re
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
from dataflow_testing import factories

from dataflow.contracts import (
    ClosedError,
    InvalidInputError,
    RunFailedError,
    SampleRef,
)
from dataflow.control import open_ledger
from dataflow.control.controller import Controller
from dataflow.control.flow import FlowLimits
from dataflow.control.window import WindowShape
from dataflow.launch.interleave import ProducerStuckError, run_interleaved

WATCHDOG_S = 20.0
PER_STEP = 2  # refs per optimizer window (one rank)
_names = itertools.count()


def make_ref(i: int) -> SampleRef:
    return factories.make_ref(i, nbytes=64)


def ids(first: int, count: int) -> list[str]:
    return [f"s{i:05d}" for i in range(first, first + count)]


def finish_within(seconds: float, scenario: Callable[[], Any]) -> Any:
    """Run ``scenario`` on a thread; fail the test if it has not finished after ``seconds``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = scenario()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="watchdog-scenario", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"the scenario hung: still running after {seconds}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def join_thread(name: str, timeout: float = 5.0) -> None:
    for thread in threading.enumerate():
        if thread.name == name:
            thread.join(timeout)
            assert not thread.is_alive(), f"thread {name} still alive"


@pytest.fixture
def baseline_threads():
    before = set(threading.enumerate())
    yield before
    assert set(threading.enumerate()) == before, "a thread was left running"


class LedgerStream:
    """The real control plane: the producer side commits, rank 0's queue reads, acks per step."""

    def __init__(self, *, high_refs: int | None = None) -> None:
        self.ledger = open_ledger(f"memory://interleave-{next(_names)}")
        controller = Controller(self.ledger)
        # A long idle timeout: if the queue ever ends a wait it is not by this.
        self.consumer = controller.consumer(WindowShape(1, PER_STEP), idle_timeout_s=60)
        self.consumer.open("run")
        flow = FlowLimits(high_refs=high_refs) if high_refs is not None else None
        self.side = controller.producer(flow_limits=flow)
        self.side.open("run", resume=True)
        self.queue = self.consumer.queue()

    def send(self, ref: SampleRef, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                admission = self.side.wait_for_capacity(ref.estimated_bytes, timeout=0.01)
            except TimeoutError:
                continue
            with admission:
                self.side.commit([ref])
            return True
        return False

    def end(self) -> None:
        self.side.close()

    def fail(self, reason: str) -> None:
        self.side.fail(reason)

    def ack(self, step: int, sample_ids: list[str]) -> None:
        self.consumer.ack(step, sample_ids)


STREAMS = {"ledger": LedgerStream}


@pytest.fixture(params=sorted(STREAMS))
def make_stream(request):
    return STREAMS[request.param]


def trainer_for(stream, *, max_steps: int | None = None, trained: list | None = None):
    """A trainer that reads windows of PER_STEP refs, acks each, and stops at ``max_steps``."""
    windows: list[list[str]] = [] if trained is None else trained

    def train(refs) -> list[list[str]]:
        window: list[str] = []
        while max_steps is None or len(windows) < max_steps:
            ref = refs.get()
            if ref is None:
                break
            window.append(ref.sample_id)
            if len(window) == PER_STEP:
                stream.ack(len(windows), window)
                windows.append(window)
                window = []
        return windows

    return train


def endless_producer(stream, seen_stop: threading.Event):
    def produce(stop: threading.Event) -> str:
        for i in itertools.count():
            if not stream.send(make_ref(i), stop):
                break
        seen_stop.set()
        return "stopped"

    return produce


# -- path 1: the producer finishes first -----------------------------------------------------


def test_producer_finishes_first_trainer_drains_the_tail(make_stream, baseline_threads):
    stream = make_stream()
    name = f"producer-{next(_names)}"

    def produce(stop: threading.Event) -> str:
        for i in range(11):
            assert stream.send(make_ref(i), stop)
        stream.end()
        return "closed"

    def train(refs):
        join_thread(name)  # the producer has returned before the trainer reads anything
        return trainer_for(stream)(refs)

    outcome = finish_within(
        WATCHDOG_S, lambda: run_interleaved(produce, train, stream.queue, name=name)
    )

    # 11 refs: five whole windows trained, then a clean end of stream.
    assert outcome.trained == [ids(i, PER_STEP) for i in range(0, 10, PER_STEP)]
    if isinstance(stream, LedgerStream):
        status = stream.ledger.status()
        assert status.samples["trained"] == 10
        assert dict(status.dropped_reasons) == {"partial_window": 1}  # the ledger's end rule
    assert outcome.produced == "closed"
    assert outcome.producer_finished is True


# -- path 2: the trainer stops first ---------------------------------------------------------


def test_trainer_stops_first_producer_winds_down(make_stream, baseline_threads):
    # The producer would run forever; it is paused by backpressure (4 refs in flight) once the
    # trainer stops draining, and must notice the stop request while paused.
    stream = make_stream(high_refs=4)
    seen_stop = threading.Event()

    start = time.monotonic()
    outcome = finish_within(
        WATCHDOG_S,
        lambda: run_interleaved(
            endless_producer(stream, seen_stop),
            trainer_for(stream, max_steps=3),
            stream.queue,
            stop_timeout_s=5,
        ),
    )

    assert outcome.trained == [ids(0, 2), ids(2, 2), ids(4, 2)]
    assert outcome.produced == "stopped"
    assert outcome.producer_finished is False
    assert seen_stop.is_set()
    assert time.monotonic() - start < 5, "the wind-down waited for the stop timeout"


def test_on_stop_reaches_a_producer_with_its_own_stop(baseline_threads):
    stream = LedgerStream()
    own_stop = threading.Event()  # like RolloutProducer.stop(): the producer ignores the event

    def produce(_: threading.Event) -> str:
        for i in range(PER_STEP):
            assert stream.send(make_ref(i), threading.Event())
        own_stop.wait(WATCHDOG_S)
        return "stopped by on_stop"

    outcome = finish_within(
        WATCHDOG_S,
        lambda: run_interleaved(
            produce,
            trainer_for(stream, max_steps=1),
            stream.queue,
            on_stop=own_stop.set,
            stop_timeout_s=5,
        ),
    )
    assert outcome.trained == [ids(0, 2)]
    assert outcome.produced == "stopped by on_stop"
    assert outcome.producer_finished is False


# -- path 3: the producer raises -------------------------------------------------------------


def test_producer_error_unblocks_the_trainer_and_is_reraised(make_stream, baseline_threads):
    stream = make_stream()
    raised_at: list[float] = []

    def produce_then_crash(stop: threading.Event) -> None:
        for i in range(4):
            stream.send(make_ref(i), stop)
        raised_at.append(time.monotonic())
        raise ValueError("rollout s00004: the target returned NaN hidden states")

    with pytest.raises(ValueError) as info:
        finish_within(
            WATCHDOG_S,
            lambda: run_interleaved(produce_then_crash, trainer_for(stream), stream.queue),
        )
    unblocked_in = time.monotonic() - raised_at[0]

    assert str(info.value) == "rollout s00004: the target returned NaN hidden states"
    assert not hasattr(info.value, "__notes__"), "the trainer's consequence was reported"
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "produce_then_crash" in frames, "the producer thread's traceback was lost"
    assert unblocked_in < 2.0, f"the trainer was unblocked only after {unblocked_in:.2f}s"


def test_producer_that_marks_its_stream_failed_is_reported_once(make_stream, baseline_threads):
    stream = make_stream()

    def produce(stop: threading.Event) -> None:
        stream.send(make_ref(0), stop)
        stream.fail("capture failed")
        raise OSError("engine connection reset")

    with pytest.raises(OSError) as info:
        finish_within(
            WATCHDOG_S, lambda: run_interleaved(produce, trainer_for(stream), stream.queue)
        )
    assert str(info.value) == "engine connection reset"
    assert not hasattr(info.value, "__notes__")


def test_trainer_sees_run_failed_from_get(baseline_threads):
    stream = LedgerStream()
    seen: list[BaseException] = []

    def produce(stop: threading.Event) -> None:
        raise ValueError("tokenizer mismatch")

    def train(refs) -> None:
        try:
            refs.get()
        except RunFailedError as exc:
            seen.append(exc)
            raise

    with pytest.raises(ValueError, match="^tokenizer mismatch$"):
        finish_within(WATCHDOG_S, lambda: run_interleaved(produce, train, stream.queue, name="p"))
    assert len(seen) == 1
    assert str(seen[0]) == "the producer thread 'p' failed: ValueError: tokenizer mismatch"
    assert isinstance(seen[0].__cause__, ValueError)


def test_producer_error_while_winding_down_is_not_swallowed(make_stream, baseline_threads):
    stream = make_stream()

    def produce(stop: threading.Event) -> None:
        for i in range(PER_STEP):
            stream.send(make_ref(i), stop)
        stop.wait(WATCHDOG_S)
        raise OSError("could not hand back 3 leases: ledger is read-only")

    with pytest.raises(OSError) as info:
        finish_within(
            WATCHDOG_S,
            lambda: run_interleaved(produce, trainer_for(stream, max_steps=1), stream.queue),
        )
    assert str(info.value) == "could not hand back 3 leases: ledger is read-only"
    assert not hasattr(info.value, "__notes__")


@pytest.mark.parametrize("where", ["get", "idle_timeout_s"])
def test_a_trainer_timeout_is_the_trainers_error(make_stream, where, baseline_threads):
    stream = make_stream()

    def idle_producer(stop: threading.Event) -> str:
        stop.wait(WATCHDOG_S)  # produces nothing, stops when asked
        return "stopped"

    def train(refs) -> None:
        refs.get(timeout=0.1 if where == "get" else None)

    idle = 0.1 if where == "idle_timeout_s" else None
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        finish_within(
            WATCHDOG_S,
            lambda: run_interleaved(idle_producer, train, stream.queue, idle_timeout_s=idle),
        )
    assert str(info.value) == "no ref to train on within 0.1s"
    assert time.monotonic() - start < 5


# -- both fail, or the trainer alone ---------------------------------------------------------


def test_trainer_error_never_masks_the_producer_error(make_stream, baseline_threads):
    stream = make_stream()
    name = f"producer-{next(_names)}"
    trainer_has_read = threading.Event()

    def produce(stop: threading.Event) -> None:
        for i in range(PER_STEP):
            stream.send(make_ref(i), stop)
        trainer_has_read.wait(WATCHDOG_S)
        raise ValueError("capture failed")

    def train(refs) -> None:
        for _ in range(PER_STEP):
            refs.get()
        trainer_has_read.set()
        join_thread(name)  # the producer has failed; the trainer fails on its own account
        raise RuntimeError("loss is nan at step 0")

    with pytest.raises(ValueError) as info:
        finish_within(WATCHDOG_S, lambda: run_interleaved(produce, train, stream.queue, name=name))
    assert str(info.value) == "capture failed"
    assert info.value.__notes__ == ["the trainer failed too: RuntimeError: loss is nan at step 0"]
    assert isinstance(info.value.__context__, RuntimeError)
    assert str(info.value.__context__) == "loss is nan at step 0"


def test_trainer_error_alone_stops_the_producer(make_stream, baseline_threads):
    stream = make_stream(high_refs=4)
    seen_stop = threading.Event()

    def train(refs) -> None:
        refs.get()
        raise RuntimeError("bad batch: 3 ranks disagree on the schema")

    with pytest.raises(RuntimeError) as info:
        finish_within(
            WATCHDOG_S,
            lambda: run_interleaved(endless_producer(stream, seen_stop), train, stream.queue),
        )
    assert str(info.value) == "bad batch: 3 ranks disagree on the schema"
    assert not hasattr(info.value, "__notes__")
    assert seen_stop.is_set()


def test_ctrl_c_stays_ctrl_c_and_carries_the_producer_error(baseline_threads):
    # The real SIGINT path is in test_interleave_interrupt.py; here the interrupt is raised
    # where the signal handler would raise it, after the producer failed on its own.
    stream = LedgerStream()
    name = f"producer-{next(_names)}"

    def produce(stop: threading.Event) -> None:
        raise ValueError("engine died")

    def train(refs) -> None:
        join_thread(name)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        finish_within(WATCHDOG_S, lambda: run_interleaved(produce, train, stream.queue, name=name))
    assert info.value.__notes__ == ["the producer failed too: ValueError: engine died"]
    assert isinstance(info.value.__context__, ValueError)


# -- a producer that ignores the stop request ------------------------------------------------


def test_stuck_producer_is_reported_not_left_silently(baseline_threads):
    release = threading.Event()
    queue = LedgerStream().queue

    def ignore_stop(stop: threading.Event) -> None:
        release.wait(WATCHDOG_S)  # deaf to the stop event

    try:
        with pytest.raises(ProducerStuckError) as info:
            finish_within(
                WATCHDOG_S,
                lambda: run_interleaved(
                    ignore_stop, lambda refs: "done", queue, stop_timeout_s=0.2, name="deaf"
                ),
            )
    finally:
        release.set()
        join_thread("deaf")
    message = str(info.value)
    assert re.fullmatch(
        r"the producer thread 'deaf' did not stop within 0\.2s of the stop request; "
        r"it is still running in wait\(\) at .+:\d+",
        message,
    ), message
    assert info.value.thread_name == "deaf"
    assert isinstance(info.value, RunFailedError)


def test_stuck_producer_is_attached_to_a_trainer_error(baseline_threads):
    release = threading.Event()

    def ignore_stop(stop: threading.Event) -> None:
        release.wait(WATCHDOG_S)

    def train(refs) -> None:
        raise RuntimeError("optimizer state corrupt")

    try:
        with pytest.raises(RuntimeError) as info:
            finish_within(
                WATCHDOG_S,
                lambda: run_interleaved(
                    ignore_stop, train, LedgerStream().queue, stop_timeout_s=0.2, name="deaf2"
                ),
            )
    finally:
        release.set()
        join_thread("deaf2")
    assert str(info.value) == "optimizer state corrupt"
    [note] = info.value.__notes__
    assert note.startswith(
        "stopping the producer failed too: ProducerStuckError: the producer thread 'deaf2' did "
        "not stop within 0.2s"
    )


# -- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"producer": 3}, "run_interleaved: producer must be callable, got 3"),
        ({"trainer": None}, "run_interleaved: trainer must be callable, got None"),
        ({"queue": [1]}, "run_interleaved: queue must be a RefQueue (get/close), got list"),
        ({"stop_timeout_s": 0}, "run_interleaved: stop_timeout_s must be a number > 0, got 0"),
        ({"poll_s": True}, "run_interleaved: poll_s must be a number > 0, got True"),
        ({"idle_timeout_s": -1}, "run_interleaved: idle_timeout_s must be a number > 0, got -1"),
        ({"on_stop": "x"}, "run_interleaved: on_stop must be callable, got 'x'"),
        ({"name": ""}, "run_interleaved: name must be a non-empty str, got ''"),
    ],
)
def test_bad_arguments_are_refused_before_any_thread_starts(kwargs, message, baseline_threads):
    queue = LedgerStream().queue
    ran: list[str] = []
    arguments: dict[str, Any] = {
        "producer": lambda stop: ran.append("producer"),
        "trainer": lambda refs: ran.append("trainer"),
        "queue": queue,
        **kwargs,
    }
    with pytest.raises(InvalidInputError) as info:
        run_interleaved(**arguments)
    assert str(info.value) == message
    assert ran == []
    with pytest.raises(TimeoutError):  # the queue was not closed either
        queue.get(timeout=0)


def test_the_hand_off_is_closed_when_the_trainer_returns(baseline_threads):
    stream = LedgerStream()
    outcome = finish_within(
        WATCHDOG_S, lambda: run_interleaved(lambda stop: "done", lambda refs: refs, stream.queue)
    )
    assert outcome.produced == "done"
    with pytest.raises(ClosedError, match="^RankQueue of rank 0 is closed$"):
        stream.queue.get(timeout=0)
