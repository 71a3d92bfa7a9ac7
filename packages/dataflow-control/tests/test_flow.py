"""Flow control read from a real (memory://) ledger: watermarks, hysteresis, hard byte cap."""

from __future__ import annotations

import threading
import time

import pytest
from control_fixtures import make_refs, memory_uri

from dataflow.contracts.errors import CapacityExceededError, InvalidInputError, RunFailedError
from dataflow.contracts.states import ConsumerState
from dataflow.control.flow import FlowControl, FlowLimits
from dataflow.control.ledger import open_ledger


@pytest.fixture
def ledger():
    ledger = open_ledger(memory_uri())
    ledger.open_run("run-flow", 2, resume=False)
    yield ledger
    ledger.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"high_refs": 0}, "high_refs must be an int >= 1, got 0"),
        ({"high_refs": 4, "low_refs": 5}, r"low_refs \(5\) must be <= high_refs \(4\)"),
        ({"high_refs": 4, "low_bytes": 5}, "low_bytes needs high_bytes"),
        ({"high_refs": 4, "high_bytes": 10, "low_bytes": 11}, r"low_bytes \(11\) must be <="),
        ({"high_refs": 4, "high_bytes": 10, "max_bytes": 5}, r"high_bytes \(10\) must be <= the"),
        ({"high_refs": 4, "max_bytes": 0}, "max_bytes must be an int >= 1, got 0"),
    ],
)
def test_bad_limits_are_refused(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        FlowLimits(**kwargs)


def test_a_watermark_below_one_quantum_is_refused_at_construction(ledger):
    before = ledger.status()
    with pytest.raises(InvalidInputError, match=r"at least one quantum \(8 samples"):
        FlowControl(ledger, FlowLimits(high_refs=7), quantum=8)
    with pytest.raises(InvalidInputError, match="high_refs=16, low_refs=4"):
        FlowControl(ledger, FlowLimits(high_refs=16, low_refs=4), quantum=8)
    assert ledger.status() == before


def test_hysteresis_in_refs_and_bytes_shares_one_latch(ledger):
    flow = FlowControl(ledger, FlowLimits(high_refs=10, low_refs=4, high_bytes=2000), quantum=2)
    ledger.commit(make_refs(0, 9, nbytes=100))
    assert not flow.snapshot().paused  # 9 refs, 900 bytes
    ledger.commit(make_refs(9, 1, nbytes=100))
    snap = flow.snapshot()
    assert (snap.paused, snap.in_flight, snap.in_flight_bytes) == (True, 10, 1000)
    ledger.drop([f"s{i:05d}" for i in range(5)], "test")
    assert flow.snapshot().paused  # 5 refs: above low, still paused
    ledger.drop(["s00005"], "test")
    assert not flow.snapshot().paused  # 4 refs: resumed
    ledger.commit(make_refs(10, 1, nbytes=1600))
    assert flow.snapshot().paused  # 5 refs but 2000 bytes: the byte watermark pauses
    ledger.drop(["s00010"], "test")
    snap = flow.snapshot()
    assert not snap.paused
    assert (snap.pause_transitions, snap.resume_transitions) == (2, 2)


def test_never_paused_below_one_quantum_even_over_the_byte_watermark(ledger):
    ledger2 = open_ledger(memory_uri())
    ledger2.open_run("run-q", 4, resume=False)
    flow = FlowControl(ledger2, FlowLimits(high_refs=4, high_bytes=150), quantum=4)
    ledger2.commit(make_refs(0, 2, nbytes=100))
    assert not flow.snapshot().paused  # 200 bytes ≥ 150 but only 2 < 4 refs in flight
    ledger2.commit(make_refs(2, 2, nbytes=100))
    assert flow.snapshot().paused


def test_hard_cap_refuses_atomically_and_counts_reservations(ledger):
    flow = FlowControl(ledger, FlowLimits(high_refs=100, max_bytes=1000), quantum=2)
    ledger.commit(make_refs(0, 8, nbytes=100))
    before = flow.snapshot()
    with pytest.raises(CapacityExceededError, match="admitting 300 bytes would pass the hard cap"):
        flow.try_admit(300)
    after = flow.snapshot()
    assert after.reserved_bytes == 0 and after.refusals == 1
    assert (after.in_flight, after.in_flight_bytes) == (before.in_flight, before.in_flight_bytes)
    admission = flow.try_admit(200)
    assert flow.snapshot().reserved_bytes == 200
    with pytest.raises(CapacityExceededError, match="reserved 200"):
        flow.try_admit(1)
    admission.release()
    admission.release()  # idempotent
    assert flow.snapshot().reserved_bytes == 0
    with flow.try_admit(200):
        ledger.commit(make_refs(8, 2, nbytes=100))
    snap = flow.snapshot()
    assert (snap.reserved_bytes, snap.in_flight_bytes) == (0, 1000)


def test_wait_for_capacity_blocks_until_the_consumer_drains_and_accounts_the_pause(ledger):
    flow = FlowControl(ledger, FlowLimits(high_refs=4, low_refs=2), quantum=2, poll_s=0.005)
    ledger.commit(make_refs(0, 4))

    def consumer() -> None:
        time.sleep(0.15)
        ledger.drop(["s00000", "s00001"], "test")

    thread = threading.Thread(target=consumer)
    thread.start()
    start = time.monotonic()
    with flow.wait_for_capacity(timeout=5):
        waited = time.monotonic() - start
    thread.join()
    snap = flow.snapshot()
    assert waited >= 0.1
    assert snap.pauses == 1
    assert 0.1 <= snap.paused_s <= waited + 0.05
    assert snap.max_pause_s == snap.paused_s
    with flow.wait_for_capacity(timeout=1):  # not paused: no new pause counted
        pass
    assert flow.snapshot().pauses == 1


def test_wait_for_capacity_times_out_with_nothing_reserved(ledger):
    flow = FlowControl(ledger, FlowLimits(high_refs=4, max_bytes=1000), quantum=2, poll_s=0.005)
    ledger.commit(make_refs(0, 4, nbytes=100))
    ledger.assign_window(1, 2)  # the consumer holds a window: waiting could help
    with pytest.raises(TimeoutError, match="no capacity for 0 bytes within 0.05s"):
        flow.wait_for_capacity(timeout=0.05)
    snap = flow.snapshot()
    assert snap.reserved_bytes == 0 and snap.pauses == 1 and snap.paused_s >= 0.05


def test_waiting_that_cannot_help_fails_at_once(ledger):
    flow = FlowControl(ledger, FlowLimits(high_refs=4, max_bytes=250), quantum=2)
    with pytest.raises(CapacityExceededError, match="waiting cannot help"):
        flow.wait_for_capacity(300, timeout=10)  # more than the cap on its own
    ledger.commit(make_refs(0, 1, nbytes=200))  # less than a window, nothing assigned
    start = time.monotonic()
    with pytest.raises(CapacityExceededError, match="the cap cannot fit one"):
        flow.wait_for_capacity(100, timeout=10)
    assert time.monotonic() - start < 1
    assert flow.snapshot().reserved_bytes == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_admission_sizes_are_refused(ledger, bad):
    flow = FlowControl(ledger, FlowLimits(high_refs=4), quantum=2)
    with pytest.raises(InvalidInputError, match=f"nbytes must be an int >= 0, got {bad!r}"):
        flow.try_admit(bad)
    with pytest.raises(InvalidInputError, match="timeout must be None or a number >= 0"):
        flow.wait_for_capacity(0, timeout=-1)
    assert flow.snapshot().reserved_bytes == 0


def test_a_paused_producer_stops_waiting_once_the_consumer_failed(ledger):
    flow = FlowControl(ledger, FlowLimits(high_refs=4), quantum=2, poll_s=0.005)
    ledger.commit(make_refs(0, 4))
    ledger.set_consumer_state(ConsumerState.RUNNING)

    def consumer_dies() -> None:
        time.sleep(0.1)
        ledger.set_consumer_state(ConsumerState.FAILED, "trainer OOM at step 3")

    thread = threading.Thread(target=consumer_dies)
    thread.start()
    start = time.monotonic()
    with pytest.raises(RunFailedError, match=r"consumer FAILED.*trainer OOM at step 3"):
        flow.wait_for_capacity(timeout=10)
    thread.join()
    assert 0.1 <= time.monotonic() - start < 5
    assert flow.snapshot().reserved_bytes == 0


def test_a_consumer_failure_does_not_stop_a_producer_that_is_not_held_back(ledger):
    flow = FlowControl(ledger, FlowLimits(high_refs=4), quantum=2)
    ledger.commit(make_refs(0, 1))
    ledger.set_consumer_state(ConsumerState.FAILED, "gone")
    with flow.wait_for_capacity(timeout=1) as admission:
        assert admission is not None  # under the watermark: work may go on (a resume trains it)


def test_a_long_pause_is_logged_once_per_interval(ledger, caplog):
    now = [0.0]
    flow = FlowControl(
        ledger,
        FlowLimits(high_refs=4, low_refs=2),
        quantum=2,
        clock=lambda: now[0],
        sleep=lambda s: now.__setitem__(0, now[0] + s),
        poll_s=1.0,
        max_poll_s=1.0,
        warn_after_s=30.0,
    )
    ledger.commit(make_refs(0, 4))
    caplog.set_level("INFO", logger="dataflow.control.flow")
    with pytest.raises(TimeoutError):
        flow.wait_for_capacity(timeout=95)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3, warnings  # at 30 s, 60 s and 90 s
    assert warnings[0] == (
        "producer paused for 30s: 4 refs / 400 bytes in flight (resumes at <= 2 refs; the "
        "consumer is not_started)"
    )
    assert warnings[2].startswith("producer paused for 90s")
    ledger.drop(["s00000", "s00001"], "test")
    with flow.wait_for_capacity(timeout=1):
        pass
    assert any("resumed after a 95s pause" in r.getMessage() for r in caplog.records)


def test_a_bad_warning_interval_is_refused(ledger):
    with pytest.raises(InvalidInputError, match="warn_after_s must be > 0, got 0"):
        FlowControl(ledger, FlowLimits(high_refs=4), quantum=2, warn_after_s=0)
