"""The distributed ack protocol over an in-process N-rank collective (thread ranks)."""

from __future__ import annotations

import threading

import pytest
from dataflow_testing.thread_collective import ThreadCollective, run_ranks

from dataflow.contracts import Collective
from dataflow.contracts.errors import DataflowError, InvalidInputError, LedgerConflictError
from dataflow.control._abort import FeatureCleanupError
from dataflow.control.dist_ack import DistAckResult, SoloCollective, distributed_ack, run_on_rank0


class Journal:
    """Records, in order and thread-safely, what each rank did."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, int, int, tuple[str, ...]]] = []

    def add(self, what: str, rank: int, step: int, ids: list[str]) -> None:
        with self.lock:
            self.events.append((what, rank, step, tuple(ids)))


def rank_ids(rank: int) -> list[str]:
    return [f"r{rank}-a", f"r{rank}-b", f"r{rank}-a"]  # a repeat collapses


def test_thread_collective_satisfies_the_protocol():
    outcomes = run_ranks(2, lambda c: isinstance(c, Collective))
    assert outcomes == [True, True]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank0_writes_once_then_every_rank_frees_only_its_own(world):
    journal = Journal()

    def rank_fn(c: ThreadCollective) -> DistAckResult:
        return distributed_ack(
            c,
            7,
            rank_ids(c.rank),
            write=lambda step, ids: journal.add("write", c.rank, step, ids),
            free_local=lambda step, ids: journal.add("free", c.rank, step, ids),
        )

    outcomes = run_ranks(world, rank_fn)
    union = tuple(sid for r in range(world) for sid in (f"r{r}-a", f"r{r}-b"))
    writes = [e for e in journal.events if e[0] == "write"]
    assert writes == [("write", 0, 7, union)]
    frees = sorted(e for e in journal.events if e[0] == "free")
    assert frees == [("free", r, 7, (f"r{r}-a", f"r{r}-b")) for r in range(world)]
    # the write happened before any rank freed anything
    assert journal.events[0][0] == "write"
    for rank, result in enumerate(outcomes):
        assert result == DistAckResult(7, union, (f"r{rank}-a", f"r{rank}-b"))


def test_a_failed_write_raises_on_every_rank_and_nothing_is_freed():
    journal = Journal()

    def write(step: int, ids: list[str]) -> None:
        raise LedgerConflictError("sample 'r1-a' is not ASSIGNED")

    outcomes = run_ranks(
        3,
        lambda c: distributed_ack(
            c,
            3,
            rank_ids(c.rank),
            write=write,
            free_local=lambda s, i: journal.add("free", 0, s, i),
        ),
    )
    for exc in outcomes:
        assert type(exc) is LedgerConflictError
        assert "distributed ack of step 3 (nothing was freed on any rank) failed on rank 0" in str(
            exc
        )
        assert "LedgerConflictError: sample 'r1-a' is not ASSIGNED" in str(exc)
    assert journal.events == []


def test_a_non_taxonomy_write_failure_raises_a_dataflow_error_everywhere():
    def write(step: int, ids: list[str]) -> None:
        raise OSError("disk full")

    outcomes = run_ranks(2, lambda c: distributed_ack(c, 1, ["x"], write=write))
    for exc in outcomes:
        assert type(exc) is DataflowError
        assert "OSError: disk full" in str(exc)


def test_ranks_disagreeing_on_the_step_write_nothing():
    journal = Journal()
    outcomes = run_ranks(
        2,
        lambda c: distributed_ack(
            c,
            5 if c.rank == 0 else 6,
            rank_ids(c.rank),
            write=lambda s, i: journal.add("write", 0, s, i),
        ),
    )
    for exc in outcomes:
        assert isinstance(exc, InvalidInputError)
        assert "ranks disagree on the optimizer step: [5, 6]" in str(exc)
    assert journal.events == []


def test_a_negative_step_is_refused_on_every_rank_without_a_hang():
    outcomes = run_ranks(2, lambda c: distributed_ack(c, -1, ["x"], write=lambda s, i: None))
    for exc in outcomes:
        assert isinstance(exc, InvalidInputError)
        assert "step must be an int >= 0, got -1" in str(exc)


def test_cleanup_failure_on_one_rank_raises_on_every_rank_after_the_commit():
    journal = Journal()

    def free(rank: int):
        def inner(step: int, ids: list[str]) -> None:
            if rank == 1:
                raise RuntimeError("segment busy")
            journal.add("free", rank, step, ids)

        return inner

    outcomes = run_ranks(
        3,
        lambda c: distributed_ack(
            c,
            2,
            rank_ids(c.rank),
            write=lambda s, i: journal.add("write", 0, s, i),
            free_local=free(c.rank),
        ),
    )
    for exc in outcomes:
        assert isinstance(exc, FeatureCleanupError)
        assert "step 2 is committed" in str(exc)
        assert "rank 1: RuntimeError: segment busy" in str(exc)
        assert "rank 0" not in str(exc) and "rank 2:" not in str(exc)
    assert [e[0] for e in journal.events].count("write") == 1
    assert sorted(e[1] for e in journal.events if e[0] == "free") == [0, 2]


def test_solo_collective_takes_the_same_path():
    journal = Journal()
    solo = SoloCollective()
    assert isinstance(solo, Collective)
    result = distributed_ack(
        solo,
        0,
        ["a", "b", "a"],
        write=lambda s, i: journal.add("write", 0, s, i),
        free_local=lambda s, i: journal.add("free", 0, s, i),
    )
    assert result == DistAckResult(0, ("a", "b"), ("a", "b"))
    assert journal.events == [("write", 0, 0, ("a", "b")), ("free", 0, 0, ("a", "b"))]


def test_run_on_rank0_hands_the_result_or_the_error_to_every_rank():
    calls = []
    outcomes = run_ranks(3, lambda c: run_on_rank0(c, "counting", lambda: calls.append(1) or 42))
    assert outcomes == [42, 42, 42]
    assert calls == [1]

    def boom() -> int:
        raise LedgerConflictError("nope")

    outcomes = run_ranks(2, lambda c: run_on_rank0(c, "reconcile", boom))
    for exc in outcomes:
        assert type(exc) is LedgerConflictError
        assert str(exc) == "reconcile failed on rank 0 (LedgerConflictError: nope)"


def test_an_unpicklable_rank0_result_is_an_error_on_every_rank_not_a_hang():
    # torch's object broadcast pickles on rank 0 before sending; a result it cannot pickle
    # must reach the other ranks as the error instead of leaving them in the broadcast.
    def unpicklable() -> object:
        return threading.Lock()

    outcomes = run_ranks(2, lambda c: run_on_rank0(c, "handing out a lock", unpicklable))
    for exc in outcomes:
        assert type(exc) is DataflowError
        assert str(exc).startswith("handing out a lock failed on rank 0 (TypeError: ")
    with pytest.raises(DataflowError, match="handing out a lock failed on rank 0"):
        run_on_rank0(SoloCollective(), "handing out a lock", unpicklable)
