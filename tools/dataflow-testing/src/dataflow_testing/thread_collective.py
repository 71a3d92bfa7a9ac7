"""An in-process Collective for N ranks on N threads: a test double of torch.distributed.

It implements the contracts' ``Collective`` protocol exactly (all-gather, broadcast, barrier
with object payloads), so control-plane protocols written against it can be tested without
torch; the trainer package tests the same protocols over real torch.distributed (gloo).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ThreadGroup:
    """The shared state of one group of ``world_size`` thread ranks."""

    def __init__(self, world_size: int, timeout_s: float = 5.0) -> None:
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout_s)
        self._slots: list[Any] = [None] * world_size

    def exchange(self, rank: int, value: Any) -> list[Any]:
        """Every rank deposits a value; every rank gets all of them in rank order."""
        self._slots[rank] = value
        self._barrier.wait()
        values = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before every rank has read it
        return values

    def abort(self) -> None:
        """Break the barrier so ranks blocked in a collective fail instead of hanging."""
        self._barrier.abort()


class ThreadCollective:
    """One rank's view of a ``ThreadGroup`` (satisfies ``dataflow.contracts.Collective``)."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self._group = group
        self._rank = rank

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._group.world_size

    def all_gather_object(self, obj: T) -> list[T]:
        return self._group.exchange(self._rank, obj)

    def broadcast_object(self, obj: T | None, src: int = 0) -> T:
        values = self._group.exchange(self._rank, obj if self._rank == src else None)
        result: T = values[src]
        return result

    def barrier(self) -> None:
        self._group.exchange(self._rank, None)


def run_ranks(
    world_size: int, fn: Callable[[ThreadCollective], T], timeout_s: float = 20.0
) -> list[T | BaseException]:
    """Run ``fn`` on ``world_size`` thread ranks; return each rank's result or exception."""
    group = ThreadGroup(world_size)
    outcomes: list[T | BaseException] = [RuntimeError("rank did not finish")] * world_size

    def body(rank: int) -> None:
        try:
            outcomes[rank] = fn(ThreadCollective(group, rank))
        except BaseException as exc:  # handed back to the test to assert on
            # No barrier abort here: a rank raising after a collective must not break the
            # others still returning from it. A real hang trips the barrier's timeout.
            outcomes[rank] = exc

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
    if any(thread.is_alive() for thread in threads):
        group.abort()
        raise TimeoutError(f"thread ranks still running after {timeout_s}s (a hang)")
    return outcomes
