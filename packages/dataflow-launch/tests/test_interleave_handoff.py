"""HandoffQueue: the bounded in-process hand-off, with real threads."""

from __future__ import annotations

import threading
import time

import pytest
from dataflow_testing import factories

from dataflow.contracts import (
    ClosedError,
    InvalidInputError,
    RefQueue,
    RunFailedError,
    SampleRef,
)
from dataflow.launch.interleave import HandoffQueue


def make_ref(i: int) -> SampleRef:
    return factories.make_ref(
        i, width=0, feature="h", shape=(2,), dtype="int64", generation=0, nbytes=0, num_tokens=0
    )


def drain(queue: HandoffQueue) -> list[str]:
    out = []
    while (ref := queue.get(timeout=1)) is not None:
        out.append(ref.sample_id)
    return out


def test_is_a_ref_queue_in_fifo_order_ending_cleanly():
    queue = HandoffQueue(3)
    assert isinstance(queue, RefQueue)
    for i in range(3):
        assert queue.put(make_ref(i)) is True
    queue.finish()
    assert drain(queue) == ["s0", "s1", "s2"]
    assert queue.get(timeout=0) is None  # the end stays the end


def test_put_blocks_at_capacity_until_the_trainer_takes_one():
    queue = HandoffQueue(2)
    queue.put(make_ref(0))
    queue.put(make_ref(1))
    with pytest.raises(
        TimeoutError, match=r"^HandoffQueue: no room within 0\.05s \(2 refs wait\)$"
    ):
        queue.put(make_ref(2), timeout=0.05)
    assert len(queue) == 2  # the refused put queued nothing

    done = threading.Event()
    thread = threading.Thread(target=lambda: (queue.put(make_ref(2)), done.set()))
    thread.start()
    assert not done.wait(0.05)  # still blocked: the queue is full
    assert queue.get().sample_id == "s0"
    thread.join(5)
    assert done.is_set()
    queue.finish()
    assert drain(queue) == ["s1", "s2"]


def test_close_wakes_a_blocked_put_which_returns_false():
    queue = HandoffQueue(1)
    queue.put(make_ref(0))
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(queue.put(make_ref(1))))
    thread.start()
    time.sleep(0.02)
    queue.close()
    thread.join(5)
    assert result == [False]
    assert len(queue) == 0
    with pytest.raises(ClosedError, match="^HandoffQueue is closed$"):
        queue.get()


def test_failure_is_raised_at_once_even_with_refs_buffered():
    queue = HandoffQueue(4)
    queue.put(make_ref(0))
    queue.fail("target engine died")
    with pytest.raises(
        RunFailedError,
        match=r"^the producer failed \(target engine died\); the stream did not end cleanly$",
    ):
        queue.get()
    queue.finish()  # a failure never turns into a clean end
    with pytest.raises(RunFailedError):
        queue.get(timeout=0)


def test_failure_wakes_a_blocked_get():
    queue = HandoffQueue(1)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            queue.get()
        except RunFailedError as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.02)
    queue.fail("boom")
    thread.join(5)
    assert not thread.is_alive()
    assert len(errors) == 1


def test_get_times_out_with_nothing_to_return():
    queue = HandoffQueue(1)
    with pytest.raises(TimeoutError, match=r"^HandoffQueue: no ref within 0\.01s$"):
        queue.get(timeout=0.01)


@pytest.mark.parametrize("end", ["finish", "fail"])
def test_put_after_the_end_is_refused(end):
    queue = HandoffQueue(2)
    queue.put(make_ref(0))
    if end == "finish":
        queue.finish()
    else:
        queue.fail("x")
    message = (
        "the stream already finished" if end == "finish" else r"the stream already failed \(x\)"
    )
    with pytest.raises(ClosedError, match=f"^HandoffQueue: {message}$"):
        queue.put(make_ref(1))
    assert len(queue) == 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: HandoffQueue(0), "HandoffQueue: capacity must be an int >= 1, got 0"),
        (lambda: HandoffQueue(True), "HandoffQueue: capacity must be an int >= 1, got True"),
        (lambda: HandoffQueue(1).put("s0"), "HandoffQueue.put takes a SampleRef, got str"),
        (
            lambda: HandoffQueue(1).put(make_ref(0), timeout=-1),
            "HandoffQueue.put: timeout must be None or a number >= 0, got -1",
        ),
        (
            lambda: HandoffQueue(1).get(timeout="1"),
            "HandoffQueue.get: timeout must be None or a number >= 0, got '1'",
        ),
        (lambda: HandoffQueue(1).fail(""), "HandoffQueue.fail needs a non-empty reason"),
    ],
)
def test_bad_input_is_refused(call, message):
    with pytest.raises(InvalidInputError) as info:
        call()
    assert str(info.value) == message


def test_refused_put_changes_nothing():
    queue = HandoffQueue(2)
    queue.put(make_ref(0))
    with pytest.raises(InvalidInputError):
        queue.put({"sample_id": "s1"})
    queue.finish()
    assert drain(queue) == ["s0"]
