"""RankQueue on its own over a real (memory://) ledger: polling, backoff, end of stream."""

from __future__ import annotations

import pytest
from control_fixtures import make_refs, memory_uri

from dataflow.contracts import ProducerState
from dataflow.contracts.errors import InvalidInputError
from dataflow.control.dispatch import Dispatcher
from dataflow.control.ledger import open_ledger
from dataflow.control.queue import RankQueue
from dataflow.control.window import WindowShape


class FakeTime:
    """A clock that only moves when the queue sleeps; records every sleep."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def ledger():
    ledger = open_ledger(memory_uri())
    ledger.open_run("run-q", 4, resume=False)
    ledger.set_producer_state(ProducerState.RUNNING)
    yield ledger
    ledger.close()


def test_polling_backs_off_and_stops_at_the_deadline(ledger):
    fake = FakeTime()
    queue = RankQueue(ledger, 0, poll_s=0.01, max_poll_s=0.05, clock=fake.clock, sleep=fake.sleep)
    with pytest.raises(TimeoutError, match=r"within 0.2s \(producer running, backlog 0\)"):
        queue.get(timeout=0.2)
    assert fake.sleeps[:4] == [0.01, 0.02, 0.04, 0.05]
    assert set(fake.sleeps[3:-1]) == {0.05}
    assert sum(fake.sleeps) == pytest.approx(0.2)


def test_timeout_zero_polls_once(ledger):
    fake = FakeTime()
    queue = RankQueue(ledger, 0, clock=fake.clock, sleep=fake.sleep)
    with pytest.raises(TimeoutError):
        queue.get(timeout=0)
    assert fake.sleeps == []


def test_each_assigned_ref_is_handed_out_once_until_acked(ledger):
    ledger.commit(make_refs(0, 8))
    ledger.assign_window(2, 2)
    rank1 = RankQueue(ledger, 1)
    assert [rank1.get(timeout=1).sample_id for _ in range(2)] == ["s00002", "s00003"]
    with pytest.raises(TimeoutError):  # still ASSIGNED in the ledger, but already handed out
        rank1.get(timeout=0.02)
    ledger.ack(0, ["s00000", "s00001", "s00002", "s00003"])
    ledger.assign_window(2, 2)
    assert [rank1.get(timeout=1).sample_id for _ in range(2)] == ["s00006", "s00007"]
    assert rank1.handed_out == 4


def test_a_reading_rank_does_not_end_before_the_dispatcher_dropped_the_tail(ledger):
    ledger.commit(make_refs(0, 6))
    dispatcher = Dispatcher(ledger, WindowShape(dp_size=2, batch_size=2))
    rank0, rank1 = RankQueue(ledger, 0, dispatcher=dispatcher), RankQueue(ledger, 1)
    assert [rank0.get(timeout=1).sample_id for _ in range(2)] == ["s00000", "s00001"]
    ledger.set_producer_state(ProducerState.CLOSED)
    assert [rank1.get(timeout=1).sample_id for _ in range(2)] == ["s00002", "s00003"]
    # closed, but the 2-sample tail is still committed: rank 1 must wait, not end
    with pytest.raises(TimeoutError, match="producer closed, backlog 2"):
        rank1.get(timeout=0.05)
    assert rank0.get(timeout=1) is None  # the dispatcher drops the tail and rank 0 ends
    assert rank1.get(timeout=1) is None
    status = ledger.status()
    assert dict(status.dropped_reasons) == {"partial_window": 2}
    assert dispatcher.tail_dropped == 2 and dispatcher.windows_opened == 1


def test_the_dispatcher_looks_ahead_a_bounded_number_of_windows(ledger):
    ledger.commit(make_refs(0, 20))
    dispatcher = Dispatcher(ledger, WindowShape(dp_size=1, batch_size=4), lookahead=3)
    assert dispatcher.pump() == 3
    assert dispatcher.pump() == 0
    assert ledger.status().samples["assigned"] == 12


@pytest.mark.parametrize("bad", [-1, "1", True])
def test_bad_timeouts_are_refused(ledger, bad):
    queue = RankQueue(ledger, 0)
    with pytest.raises(InvalidInputError, match="timeout must be None or a number >= 0"):
        queue.get(timeout=bad)
    with pytest.raises(InvalidInputError, match="rank must be an int >= 0, got -1"):
        RankQueue(ledger, -1)
