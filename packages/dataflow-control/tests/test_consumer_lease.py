"""The fenced consumer lease on every ledger backend (issue 18 item 4): a second consumer is
refused naming the holder and nothing changes; after the lease expires it takes over and the
old consumer's acks and renewals are refused as stale.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from control_fixtures import make_refs
from dataflow_testing.redis import RedisServer

from dataflow.contracts import LedgerConflictError
from dataflow.control import Controller, WindowShape
from dataflow.control.ledger import open_ledger

_names = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "sqlite", "redis"])
def uri(request, tmp_path):
    if request.param == "memory":
        return f"memory://lease-{next(_names)}"
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/ledger.sqlite"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url(0, namespace=f"lease-{next(_names)}-{os.getpid()}")


def test_a_live_lease_refuses_a_second_consumer_naming_it_and_changes_nothing(uri):
    clock = Clock()
    ledger = open_ledger(uri, clock=clock)
    ledger.open_run("r", 2, resume=False)
    first = ledger.acquire_consumer_lease("host-a", 4242, 30)
    before = ledger.status(), ledger.consumer_lease()
    with pytest.raises(LedgerConflictError) as err:
        ledger.acquire_consumer_lease("host-b", 777, 30)
    text = str(err.value)
    assert "another consumer holds this run" in text
    assert "host host-a pid 4242" in text and "epoch 1" in text and "expires in 30s" in text
    assert (ledger.status(), ledger.consumer_lease()) == before
    assert first.epoch == 1
    ledger.close()


def test_after_expiry_a_takeover_fences_the_old_consumers_acks(uri):
    clock = Clock()
    ledger = open_ledger(uri, clock=clock)
    ledger.open_run("r", 2, resume=False)
    ledger.commit(make_refs(0, 2))
    window = ledger.assign_window(1, 2)
    assert window is not None
    old = ledger.acquire_consumer_lease("host-a", 4242, 30)
    clock.now += 10
    ledger.renew_consumer_lease(old.epoch, 30)  # the heartbeat keeps it: still refused at +39
    clock.now += 29
    with pytest.raises(LedgerConflictError):
        ledger.acquire_consumer_lease("host-b", 777, 30)
    clock.now += 2  # no heartbeat since the one at +10: expired at +40
    new = ledger.acquire_consumer_lease("host-b", 777, 30)
    assert new.epoch == old.epoch + 1
    before = ledger.status()
    with pytest.raises(
        LedgerConflictError, match=r"lease \(epoch 1\) is stale.*host host-b pid 777"
    ):
        ledger.ack(0, ["s00000", "s00001"], epoch=old.epoch)
    with pytest.raises(LedgerConflictError, match="stale"):
        ledger.renew_consumer_lease(old.epoch, 30)
    assert ledger.status() == before
    ledger.ack(0, ["s00000", "s00001"], epoch=new.epoch)
    assert ledger.status().markers.trained_step == 0
    ledger.release_consumer_lease(new.epoch)
    assert ledger.consumer_lease().pid == 0
    ledger.acquire_consumer_lease("host-c", 1, 30)  # released: free at once
    ledger.close()


_SECOND = textwrap.dedent(
    """
    import sys
    from dataflow.control import Controller, WindowShape
    from dataflow.control.ledger import open_ledger
    from dataflow.contracts import LedgerConflictError
    side = Controller(open_ledger(sys.argv[1])).consumer(WindowShape(dp_size=1, batch_size=2))
    try:
        side.open("r", resume=True)
    except LedgerConflictError as exc:
        print(exc)
        sys.exit(3)
    print("opened")
    side.finish()
    """
)


@pytest.fixture(params=["sqlite", "redis"])
def shared_uri(request, tmp_path):
    """Ledgers another process can open (memory:// lives in one process)."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/ledger.sqlite"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url(0, namespace=f"lease-{next(_names)}-{os.getpid()}")


def test_a_second_consumer_process_is_refused_then_opens_once_the_first_finishes(shared_uri):
    uri = shared_uri
    ledger = open_ledger(uri)
    first = Controller(ledger).consumer(WindowShape(dp_size=1, batch_size=2), lease_s=30)
    first.open("r")
    before = ledger.status()
    second = subprocess.run(
        [sys.executable, "-c", _SECOND, uri], capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 3, second.stderr
    assert f"host {socket.gethostname()} pid {os.getpid()}" in second.stdout
    assert ledger.status() == before
    first.finish()  # releases the lease
    again = subprocess.run(
        [sys.executable, "-c", _SECOND, uri], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0 and "opened" in again.stdout, again.stderr
    ledger.close()


def test_the_heartbeat_ends_when_its_ledger_is_closed(uri):
    import threading
    import time

    from dataflow.control.lease_keeper import LeaseKeeper

    ledger = open_ledger(uri)
    ledger.open_run("r", 2, resume=False)
    keeper = LeaseKeeper(ledger, 0.3)
    keeper.acquire()
    ledger.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
        t.name == "consumer-lease" and t.is_alive() for t in threading.enumerate()
    ):
        time.sleep(0.05)
    assert not any(t.name == "consumer-lease" and t.is_alive() for t in threading.enumerate())
    keeper.release()  # idempotent, and quiet on a closed ledger


def test_a_sequence_parallel_peer_holds_no_lease_and_its_failure_marks_the_run(tmp_path):
    # dp 1 x sp 2 on a durable ledger: both processes build the side of data-parallel rank 0;
    # the lease is the job's first process's, and the peer failing alone still fails the run.
    from dataflow_testing.thread_collective import ThreadCollective, run_ranks

    from dataflow.contracts.states import ConsumerState

    uri = f"sqlite://{tmp_path}/ledger.sqlite"

    def rank_fn(collective: ThreadCollective) -> str:
        controller = Controller.open(uri)
        side = controller.consumer(WindowShape(1, 2), rank=0, collective=collective)
        side.open("r", resume=True)
        if collective.rank == 1:
            side.fail("peer crashed")
        collective.barrier()
        state = controller.status().markers.consumer.value
        collective.barrier()
        side.release_lease()
        controller.close()
        return state

    assert run_ranks(2, rank_fn) == [ConsumerState.FAILED.value] * 2
    ledger = open_ledger(uri)
    assert ledger.markers().consumer_reason == "peer crashed"
    ledger.close()
