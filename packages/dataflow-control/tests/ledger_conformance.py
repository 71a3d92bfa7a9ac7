"""The ledger conformance suite: every durable-capable backend must pass all of it.

Subclass ``LedgerConformance`` in a ``test_ledger_*.py`` module and provide the ``uri`` fixture
(a URI of a fresh, empty ledger; opening it again must reach the same ledger). The suite runs
only through the public ``open_ledger`` API and the ``Ledger`` protocol.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from dataflow_testing import factories

from dataflow.contracts import (
    ClosedError,
    ConsumerState,
    InvalidInputError,
    Ledger,
    LedgerConflictError,
    NotFoundError,
    ProducerState,
    PromptState,
    SampleRef,
    WeightVersion,
)
from dataflow.control.ledger import PARTIAL_WINDOW, open_ledger


class ManualClock:
    """Wall clock for lease deadlines that only moves when told to."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeTensor:
    """Duck-typed tensor (dtype/shape/device): what ``assert_no_tensors`` must catch."""

    dtype = "float32"
    shape = (2,)
    device = "cpu"


def make_ref(i: int, *, nbytes: int = 100, task: str | None = None, run: str = "") -> SampleRef:
    return factories.make_ref(i, nbytes=nbytes, source_task_id=task, run_id=run, metadata={"i": i})


def make_refs(start: int, count: int, **kw: object) -> list[SampleRef]:
    return [make_ref(i, **kw) for i in range(start, start + count)]  # type: ignore[arg-type]


make_task = factories.make_task


def on_handles(uri: str, count: int, work: Callable[[Ledger, int], object]) -> None:
    """Run ``work(handle, n)`` at once on ``count`` threads, each with its own handle on
    ``uri``; every handle is closed afterwards.
    """
    handles = [open_ledger(uri) for _ in range(count)]
    try:
        threads = [threading.Thread(target=work, args=(h, n)) for n, h in enumerate(handles)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for handle in handles:
            handle.close()


def ids(refs: list[SampleRef]) -> list[str]:
    return [r.sample_id for r in refs]


class LedgerConformance:
    """The contract of ``Ledger`` (dataflow.contracts.protocols), backend by backend."""

    QUANTUM = 4  # dp_size 2 * per_rank 2

    @pytest.fixture
    def uri(self) -> str:
        raise NotImplementedError("a backend's test module provides the uri fixture")

    @pytest.fixture
    def clock(self) -> ManualClock:
        return ManualClock()

    @pytest.fixture
    def ledger(self, uri: str, clock: ManualClock) -> Iterator[Ledger]:
        ledger = open_ledger(uri, clock=clock)
        yield ledger
        ledger.close()

    @pytest.fixture
    def run(self, ledger: Ledger) -> Ledger:
        """A ledger with a started run (quantum 4) and a running producer."""
        ledger.open_run("run-1", self.QUANTUM, resume=False)
        ledger.set_producer_state(ProducerState.RUNNING)
        return ledger

    # -- opening and run markers --------------------------------------------------------
    def test_is_a_ledger_and_reports_backend(self, ledger: Ledger, uri: str) -> None:
        assert isinstance(ledger, Ledger)
        assert ledger.uri == uri
        status = ledger.status()
        assert status.backend == uri.split(":", 1)[0]
        assert status.durable is ledger.durable
        assert dict(status.samples) == {
            "committed": 0,
            "assigned": 0,
            "trained": 0,
            "released": 0,
            "dropped": 0,
        }
        assert dict(status.prompts) == {"pending": 0, "leased": 0, "done": 0, "failed": 0}

    def test_open_run_fresh_sets_markers(self, ledger: Ledger) -> None:
        markers = ledger.open_run("run-1", 8, resume=False)
        assert (markers.run_id, markers.quantum) == ("run-1", 8)
        assert ledger.markers() == markers
        assert (markers.durable_step, markers.trained_step, markers.released_through) == (-1,) * 3

    def test_fresh_run_on_non_empty_ledger_is_refused(self, run: Ledger) -> None:
        run.commit(make_refs(0, 3))
        before = run.status()
        with pytest.raises(LedgerConflictError, match=r"not empty.*run 'run-1', 3 samples"):
            run.open_run("run-2", self.QUANTUM, resume=False)
        assert run.status() == before

    def test_fresh_run_on_ledger_holding_only_a_run_marker_is_refused(self, ledger: Ledger) -> None:
        ledger.open_run("run-1", 4, resume=False)
        with pytest.raises(LedgerConflictError, match="resume=True"):
            ledger.open_run("run-1", 4, resume=False)

    def test_changed_quantum_on_resume_is_refused(self, run: Ledger) -> None:
        run.commit(make_refs(0, 2))
        before = run.status()
        with pytest.raises(LedgerConflictError, match="quantum 8 differs from the run's quantum 4"):
            run.open_run("run-1", 8, resume=True)
        assert run.status() == before

    def test_resume_of_another_run_is_refused(self, run: Ledger) -> None:
        with pytest.raises(LedgerConflictError, match="belongs to run 'run-1', not to 'run-9'"):
            run.open_run("run-9", self.QUANTUM, resume=True)

    def test_resume_continues_and_quantum_zero_takes_the_runs(self, run: Ledger) -> None:
        run.commit(make_refs(0, 2))
        markers = run.open_run("run-1", 0, resume=True)
        assert markers.quantum == self.QUANTUM and markers.run_id == "run-1"
        assert run.status().samples["committed"] == 2

    def test_resume_on_empty_ledger_starts_the_run(self, ledger: Ledger) -> None:
        assert ledger.open_run("run-1", 0, resume=True).quantum == 0
        assert ledger.open_run("run-1", 6, resume=True).quantum == 6  # set once
        with pytest.raises(LedgerConflictError):
            ledger.open_run("run-1", 4, resume=True)

    def test_bad_run_arguments(self, ledger: Ledger) -> None:
        with pytest.raises(InvalidInputError, match="run id"):
            ledger.open_run("../x", 4, resume=False)
        with pytest.raises(InvalidInputError, match="quantum"):
            ledger.open_run("run-1", -1, resume=False)
        assert ledger.markers().run_id == ""

    def test_producer_markers(self, ledger: Ledger) -> None:
        with pytest.raises(LedgerConflictError, match="never started"):
            ledger.set_producer_state(ProducerState.CLOSED)
        ledger.set_producer_state(ProducerState.RUNNING)
        ledger.set_producer_state(ProducerState.CLOSED)
        ledger.set_producer_state(ProducerState.CLOSED)  # idempotent
        assert ledger.markers().producer is ProducerState.CLOSED
        with pytest.raises(InvalidInputError, match="needs a reason"):
            ledger.set_producer_state(ProducerState.FAILED)
        ledger.set_producer_state(ProducerState.FAILED, "engine crashed")
        markers = ledger.markers()
        assert (markers.producer, markers.producer_reason) == (
            ProducerState.FAILED,
            "engine crashed",
        )
        with pytest.raises(LedgerConflictError, match="failure never reads as a clean end"):
            ledger.set_producer_state(ProducerState.CLOSED)
        assert ledger.markers() == markers
        with pytest.raises(InvalidInputError, match="not_started"):
            ledger.set_producer_state(ProducerState.NOT_STARTED)
        with pytest.raises(InvalidInputError, match="ProducerState must be one of"):
            ledger.set_producer_state("bogus")  # type: ignore[arg-type]
        ledger.set_producer_state(ProducerState.RUNNING)  # a restarted producer
        assert ledger.markers().producer is ProducerState.RUNNING

    def test_consumer_markers(self, ledger: Ledger) -> None:
        ledger.set_consumer_state(ConsumerState.RUNNING)
        ledger.set_consumer_state(ConsumerState.FAILED, "oom")
        with pytest.raises(LedgerConflictError):
            ledger.set_consumer_state(ConsumerState.DONE)
        ledger.set_consumer_state(ConsumerState.RUNNING)
        ledger.set_consumer_state(ConsumerState.DONE)
        assert ledger.markers().consumer is ConsumerState.DONE

    def test_durable_step_never_goes_backwards(self, ledger: Ledger) -> None:
        ledger.set_durable_step(5)
        ledger.set_durable_step(5)
        with pytest.raises(LedgerConflictError, match="step 3 is behind the durable step 5"):
            ledger.set_durable_step(3)
        assert ledger.markers().durable_step == 5

    # -- commit -------------------------------------------------------------------------
    def test_commit_is_idempotent_and_never_delivers_twice(self, run: Ledger) -> None:
        first = run.commit(make_refs(0, 3))
        assert first.committed == ("s00000", "s00001", "s00002") and first.duplicates == ()
        again = run.commit([make_ref(1), make_ref(3), make_ref(3)])
        assert again.committed == ("s00003",)
        assert again.duplicates == ("s00001", "s00003")
        window = run.assign_window(2, 2)
        assert window is not None
        assert [sid for rank in window.assignments for sid in rank] == [
            "s00000",
            "s00001",
            "s00002",
            "s00003",
        ]
        assert run.assign_window(2, 2) is None
        assert run.status().samples["assigned"] == 4

    def test_commit_of_a_known_id_after_training_is_still_a_duplicate(self, run: Ledger) -> None:
        run.commit(make_refs(0, 4))
        window = run.assign_window(2, 2)
        assert window is not None
        run.ack(1, [sid for rank in window.assignments for sid in rank])
        run.release_through(1)
        assert run.commit(make_refs(0, 1)).duplicates == ("s00000",)
        assert run.status().samples["committed"] == 0

    def test_tensor_in_a_ref_is_refused_naming_its_path(self, run: Ledger) -> None:
        run.commit(make_refs(0, 1))
        before = run.status()
        bad = make_ref(2)
        object.__setattr__(bad, "metadata", {"x": [1, 2, FakeTensor()]})
        with pytest.raises(TypeError, match=r"refs\[1\]\.metadata\['x'\]\[2\]"):
            run.commit([make_ref(1), bad, make_ref(3)])
        assert run.status() == before  # all or nothing: s00001 was not committed either
        with pytest.raises(NotFoundError):
            run.refs(["s00001"])

    def test_non_ref_is_refused_and_nothing_committed(self, run: Ledger) -> None:
        before = run.status()
        with pytest.raises(InvalidInputError, match=r"refs\[1\] must be a SampleRef, got dict"):
            run.commit([make_ref(0), {"sample_id": "s1"}])  # type: ignore[list-item]
        with pytest.raises(InvalidInputError, match="refs must be a list or tuple"):
            run.commit(make_ref(0))  # type: ignore[arg-type]
        assert run.status() == before

    def test_ref_of_another_run_is_refused(self, run: Ledger) -> None:
        before = run.status()
        batch = [make_ref(0, run="run-1"), make_ref(1, run="other"), make_ref(2, run="run-1")]
        with pytest.raises(
            InvalidInputError, match=r"refs\[1\] \('s00001'\) belongs to run 'other'"
        ):
            run.commit(batch)
        assert run.status() == before  # nothing of the batch, not even the refs before it
        with pytest.raises(NotFoundError):
            run.refs(["s00000"])

    def test_commit_after_producer_closed_is_refused(self, run: Ledger) -> None:
        run.set_producer_state(ProducerState.CLOSED)
        with pytest.raises(LedgerConflictError, match="producer closed"):
            run.commit(make_refs(0, 1))
        assert run.status().samples["committed"] == 0

    def test_refs_round_trip_exactly(self, run: Ledger) -> None:
        refs = [make_ref(0, task="t00000"), make_ref(1)]
        run.commit(refs)
        assert run.refs(["s00001", "s00000"]) == [refs[1], refs[0]]
        with pytest.raises(NotFoundError, match="s09999"):
            run.refs(["s00000", "s09999"])

    def test_concurrent_committers_each_id_fresh_exactly_once(self, run: Ledger, uri: str) -> None:
        """Four handles on one ledger commit overlapping batches at once (threads)."""
        fresh: list[list[str]] = [[] for _ in range(4)]

        def commit_all(handle: Ledger, n: int) -> None:
            for start in range(0, 60, 6):  # every handle sends every id: 3 of 4 are duplicates
                result = handle.commit(make_refs((start + 6 * n) % 60, 6))
                fresh[n].extend(result.committed)

        on_handles(uri, 4, commit_all)
        everything = sorted(sid for ids_ in fresh for sid in ids_)
        assert everything == [f"s{i:05d}" for i in range(60)]  # each id fresh exactly once
        status = run.status()
        assert status.samples["committed"] == 60 and status.in_flight_bytes == 60 * 100

    # -- windows ------------------------------------------------------------------------
    def test_window_opens_only_when_it_can_be_completed(self, run: Ledger) -> None:
        run.commit(make_refs(0, 3))
        assert run.assign_window(2, 2) is None
        assert run.status().samples["committed"] == 3
        run.commit(make_refs(3, 6))
        w0 = run.assign_window(2, 2)
        w1 = run.assign_window(2, 2)
        assert run.assign_window(2, 2) is None
        assert w0 is not None and w1 is not None
        assert w0.assignments == (("s00000", "s00001"), ("s00002", "s00003"))
        assert w1.assignments == (("s00004", "s00005"), ("s00006", "s00007"))
        assert w1.window_id == w0.window_id + 1 and w0.size == 4
        assert run.status().samples == {
            "committed": 1,
            "assigned": 8,
            "trained": 0,
            "released": 0,
            "dropped": 0,
        }

    def test_a_window_skips_samples_no_longer_committed_between_its_own(self, run: Ledger) -> None:
        # Dropped and assigned samples sit between the committed ones in commit order: a window
        # takes the oldest committed only, and each rank gets its own in commit order.
        run.commit(make_refs(0, 10))
        run.drop(["s00001", "s00004"], "bad")
        w0 = run.assign_window(2, 2)
        assert w0 is not None
        assert w0.assignments == (("s00000", "s00002"), ("s00003", "s00005"))
        run.drop(["s00007"], "bad")
        assert run.assign_window(2, 2) is None  # s00006, s00008, s00009: three left
        run.commit(make_refs(10, 1))
        w1 = run.assign_window(2, 2)
        assert w1 is not None
        assert w1.assignments == (("s00006", "s00008"), ("s00009", "s00010"))
        assert ids(run.assigned(0)) == ["s00000", "s00002", "s00006", "s00008"]
        assert ids(run.assigned(1, after_window=w0.window_id)) == ["s00009", "s00010"]
        status = run.status()
        assert status.samples["assigned"] == 8 and status.samples["committed"] == 0
        assert status.samples["dropped"] == 3

    def test_window_shape_must_match_the_quantum(self, run: Ledger) -> None:
        run.commit(make_refs(0, 8))
        with pytest.raises(InvalidInputError, match="differs from the run's quantum 4"):
            run.assign_window(2, 4)
        with pytest.raises(InvalidInputError, match="dp_size"):
            run.assign_window(0, 4)
        assert run.status().samples["assigned"] == 0
        assert run.assign_window(4, 1) is not None  # any factorisation of the quantum

    def test_window_needs_a_quantum(self, ledger: Ledger) -> None:
        ledger.commit(make_refs(0, 4))
        with pytest.raises(LedgerConflictError, match="quantum is not set"):
            ledger.assign_window(2, 2)

    def test_assigned_per_rank_after_window(self, run: Ledger) -> None:
        run.commit(make_refs(0, 8))
        w0 = run.assign_window(2, 2)
        w1 = run.assign_window(2, 2)
        assert w0 is not None and w1 is not None
        assert ids(run.assigned(1)) == ["s00002", "s00003", "s00006", "s00007"]
        assert ids(run.assigned(0, after_window=w0.window_id)) == ["s00004", "s00005"]
        assert run.assigned(5) == []
        assert run.assigned(1)[0] == make_ref(2)

    # -- ack ----------------------------------------------------------------------------
    def _window(self, run: Ledger, start: int) -> list[str]:
        run.commit(make_refs(start, self.QUANTUM))
        window = run.assign_window(2, 2)
        assert window is not None
        return [sid for rank in window.assignments for sid in rank]

    def test_ack_marks_trained_and_records_step(self, run: Ledger) -> None:
        window = self._window(run, 0)
        run.ack(3, window)
        status = run.status()
        assert status.samples["trained"] == 4 and status.samples["assigned"] == 0
        assert status.markers.trained_step == 3
        assert status.in_flight == 0 and status.in_flight_bytes == 0
        run.ack(3, [])  # the same step again is not backwards
        assert run.markers().trained_step == 3

    def test_ack_of_unknown_id_is_refused_and_changes_nothing(self, run: Ledger) -> None:
        window = self._window(run, 0)
        before = run.status()
        with pytest.raises(LedgerConflictError, match="unknown sample id 's09999'"):
            run.ack(1, [window[0], "s09999"])
        assert run.status() == before

    def test_ack_of_unassigned_id_is_refused_and_changes_nothing(self, run: Ledger) -> None:
        window = self._window(run, 0)
        run.commit(make_refs(10, 1))
        before = run.status()
        with pytest.raises(LedgerConflictError, match="'s00010' is committed but not assigned"):
            run.ack(1, [*window, "s00010"])
        assert run.status() == before

    def test_ack_of_already_trained_id_is_refused_and_changes_nothing(self, run: Ledger) -> None:
        first = self._window(run, 0)
        run.ack(1, first)
        second = self._window(run, 4)
        before = run.status()
        with pytest.raises(LedgerConflictError, match="'s00000' was already trained at step 1"):
            run.ack(2, [*second, first[0]])
        assert run.status() == before

    def test_ack_with_step_going_backwards_is_refused(self, run: Ledger) -> None:
        run.ack(5, self._window(run, 0))
        second = self._window(run, 4)
        before = run.status()
        with pytest.raises(LedgerConflictError, match="step 4 is behind the last acked step 5"):
            run.ack(4, second)
        assert run.status() == before

    def test_ack_bad_arguments(self, run: Ledger) -> None:
        window = self._window(run, 0)
        before = run.status()
        with pytest.raises(InvalidInputError, match="step must be an int >= 0"):
            run.ack(-1, window)
        with pytest.raises(InvalidInputError, match=r"sample ids\[1\]"):
            run.ack(1, [window[0], "../etc"])
        assert run.status() == before

    def test_ack_collapses_repeated_ids(self, run: Ledger) -> None:
        window = self._window(run, 0)
        run.ack(1, window + window)
        assert run.status().samples["trained"] == 4

    # -- drop ---------------------------------------------------------------------------
    def test_drop_from_committed_and_assigned(self, run: Ledger) -> None:
        window = self._window(run, 0)
        run.commit(make_refs(10, 2, nbytes=7))
        dropped = run.drop([window[1], "s00010"], "stale")
        assert ids(dropped) == [window[1], "s00010"]
        status = run.status()
        assert status.samples["dropped"] == 2
        assert dict(status.dropped_reasons) == {"stale": 2}
        assert status.in_flight == 4 and status.in_flight_bytes == 3 * 100 + 7

    def test_drop_of_trained_or_unknown_is_refused(self, run: Ledger) -> None:
        window = self._window(run, 0)
        run.ack(1, window[:2])
        before = run.status()
        with pytest.raises(LedgerConflictError, match="already trained"):
            run.drop([window[2], window[0]], "stale")
        with pytest.raises(LedgerConflictError, match="unknown sample id"):
            run.drop(["s04444"], "stale")
        with pytest.raises(InvalidInputError, match="reason"):
            run.drop([window[2]], "")
        assert run.status() == before

    def test_drop_partial_tail_at_end_of_stream(self, run: Ledger) -> None:
        run.commit(make_refs(0, 6))
        assert run.assign_window(2, 2) is not None
        with pytest.raises(LedgerConflictError, match="not closed"):
            run.drop_partial_tail()
        run.set_producer_state(ProducerState.CLOSED)
        tail = run.drop_partial_tail()
        assert ids(tail) == ["s00004", "s00005"]
        status = run.status()
        assert dict(status.dropped_reasons) == {PARTIAL_WINDOW: 2}
        assert status.samples["committed"] == 0 and status.samples["assigned"] == 4
        assert run.drop_partial_tail() == []

    def test_drop_partial_tail_refuses_a_full_window(self, run: Ledger) -> None:
        run.commit(make_refs(0, 5))
        run.set_producer_state(ProducerState.CLOSED)
        with pytest.raises(LedgerConflictError, match="full window of 4"):
            run.drop_partial_tail()
        assert run.status().samples["committed"] == 5

    # -- release and reconcile ----------------------------------------------------------
    def test_read_only_queries_change_nothing(self, run: Ledger) -> None:
        w1, w2 = self._window(run, 0), self._window(run, 4)
        run.commit(make_refs(8, 3))
        run.ack(1, w1)
        run.ack(2, w2)
        before = run.status()
        assert ids(run.committed(2)) == ["s00008", "s00009"]
        assert ids(run.committed(10)) == ["s00008", "s00009", "s00010"]
        assert run.committed(0) == []
        assert ids(run.trained_through(1)) == w1
        assert ids(run.trained_through(2)) == w1 + w2
        assert run.trained_through(0) == []
        assert run.status() == before
        with pytest.raises(InvalidInputError, match="limit"):
            run.committed(-1)

    def test_release_through(self, run: Ledger) -> None:
        w1, w2 = self._window(run, 0), self._window(run, 4)
        run.ack(1, w1)
        run.ack(2, w2)
        released = run.release_through(1)
        assert ids(released) == w1
        status = run.status()
        assert status.samples["released"] == 4 and status.samples["trained"] == 4
        assert status.markers.released_through == 1
        assert run.release_through(1) == []

    def test_reconcile_follows_the_table(self, run: Ledger) -> None:
        w1, w2, w3 = self._window(run, 0), self._window(run, 4), self._window(run, 8)
        run.commit(make_refs(12, 2))
        run.ack(1, w1)
        run.ack(2, w2)  # w3 stays ASSIGNED
        result = run.reconcile(1, 2)
        assert result.checkpoint_step == 1
        assert list(result.released) == w1
        assert list(result.requeued) == w2 + w3
        status = run.status()
        assert status.samples == {
            "committed": 10,
            "assigned": 0,
            "trained": 0,
            "released": 4,
            "dropped": 0,
        }
        assert status.in_flight_bytes == 10 * 100
        markers = status.markers
        assert (markers.trained_step, markers.durable_step, markers.dp_size) == (1, 1, 2)
        # windows re-cut in the original commit order
        again = run.assign_window(2, 2)
        assert again is not None
        assert again.assignments == (tuple(w2[:2]), tuple(w2[2:]))
        run.ack(2, [sid for rank in again.assignments for sid in rank])

    def test_reconcile_is_idempotent(self, run: Ledger) -> None:
        w1, w2 = self._window(run, 0), self._window(run, 4)
        run.ack(1, w1)
        run.ack(2, w2)
        run.reconcile(1, 2)
        status = run.status()
        second = run.reconcile(1, 2)
        assert second.released == () and second.requeued == ()
        assert run.status() == status

    def test_reconcile_with_a_different_dp_size_recuts_windows(self, run: Ledger) -> None:
        w1, w2 = self._window(run, 0), self._window(run, 4)
        run.ack(1, w1)
        run.reconcile(1, 4)
        assert run.markers().dp_size == 4
        window = run.assign_window(4, 1)
        assert window is not None
        assert window.assignments == tuple((sid,) for sid in w2)
        with pytest.raises(InvalidInputError, match="does not divide the run's quantum 4"):
            run.reconcile(1, 3)

    def test_reconcile_ahead_of_the_ledger_is_refused(self, run: Ledger) -> None:
        run.ack(2, self._window(run, 0))
        before = run.status()
        with pytest.raises(LedgerConflictError, match="ahead of the last acked step 2"):
            run.reconcile(3, 2)
        assert run.status() == before

    def test_reconcile_behind_released_samples_is_refused(self, run: Ledger) -> None:
        run.ack(1, self._window(run, 0))
        run.ack(2, self._window(run, 4))
        run.release_through(2)  # e.g. release on ack
        before = run.status()
        with pytest.raises(
            LedgerConflictError, match="behind step 2, whose samples were already released"
        ):
            run.reconcile(1, 2)
        assert run.status() == before

    def test_reconcile_without_a_checkpoint_requeues_everything(self, run: Ledger) -> None:
        w1 = self._window(run, 0)
        run.ack(1, w1)
        result = run.reconcile(-1, 2)
        assert list(result.requeued) == w1 and result.released == ()
        assert run.markers().trained_step == -1
        run.ack(0, [])  # steps may start again from 0

    # -- prompts ------------------------------------------------------------------------
    def test_prompts_lease_fifo_and_duplicates_are_never_leased_twice(self, run: Ledger) -> None:
        result = run.add_prompts([make_task(0), make_task(1), make_task(0)])
        assert result.committed == ("t00000", "t00001") and result.duplicates == ("t00000",)
        assert run.add_prompts([make_task(1), make_task(2)]).duplicates == ("t00001",)
        leased = run.lease_prompts("w1", 2, 30.0)
        assert [t.task_id for t in leased] == ["t00000", "t00001"]
        assert leased[0] == make_task(0)
        assert [t.task_id for t in run.lease_prompts("w2", 5, 30.0)] == ["t00002"]
        assert run.lease_prompts("w2", 5, 30.0) == []
        assert run.status().prompts == {"pending": 0, "leased": 3, "done": 0, "failed": 0}

    def test_concurrent_workers_never_lease_a_task_twice(self, run: Ledger, uri: str) -> None:
        run.add_prompts([make_task(i) for i in range(80)])
        leased: list[list[str]] = [[] for _ in range(4)]

        def lease_all(handle: Ledger, n: int) -> None:
            while batch := handle.lease_prompts(f"w{n}", 3, 60.0):
                leased[n].extend(task.task_id for task in batch)

        on_handles(uri, 4, lease_all)
        everything = sorted(tid for ids_ in leased for tid in ids_)
        assert everything == [f"t{i:05d}" for i in range(80)]
        assert run.status().prompts == {"pending": 0, "leased": 80, "done": 0, "failed": 0}

    def test_complete_prompt(self, run: Ledger) -> None:
        run.add_prompts([make_task(0)])
        run.lease_prompts("w1", 1, 30.0)
        before = run.status()
        with pytest.raises(LedgerConflictError, match="leased by worker 'w1', not 'w2'"):
            run.complete_prompt("t00000", "w2")
        with pytest.raises(LedgerConflictError, match="unknown task id"):
            run.complete_prompt("t09999", "w1")
        assert run.status() == before
        assert run.complete_prompt("t00000", "w1") is PromptState.DONE
        assert run.complete_prompt("t00000", "w1") is PromptState.DONE
        assert run.status().prompts["done"] == 1

    def test_fail_prompt_retries_until_the_maximum(self, run: Ledger) -> None:
        run.add_prompts([make_task(0), make_task(1)])
        assert run.lease_prompts("w1", 1, 30.0)[0].attempt == 0
        assert run.fail_prompt("t00000", "w1", "timeout", retryable=True) is PromptState.PENDING
        # back to the tail of the queue with attempt + 1
        leased = run.lease_prompts("w1", 2, 30.0)
        assert [(t.task_id, t.attempt) for t in leased] == [("t00001", 0), ("t00000", 1)]
        assert run.fail_prompt("t00000", "w1", "timeout", retryable=True) is PromptState.PENDING
        assert run.lease_prompts("w1", 1, 30.0)[0].attempt == 2
        assert run.fail_prompt("t00000", "w1", "timeout", retryable=True) is PromptState.FAILED
        assert run.status().prompts["failed"] == 1
        with pytest.raises(
            LedgerConflictError, match=r"already failed \(timeout \(attempts exhausted: 3\)\)"
        ):
            run.complete_prompt("t00000", "w1")
        assert run.fail_prompt("t00001", "w1", "bad prompt", retryable=False) is PromptState.FAILED
        assert run.status().prompts == {"pending": 0, "leased": 0, "done": 0, "failed": 2}

    def test_expired_lease_goes_back_with_attempt_plus_one(
        self, run: Ledger, clock: ManualClock
    ) -> None:
        run.add_prompts([make_task(0)])
        run.lease_prompts("w1", 1, 10.0)
        clock.advance(9.0)
        assert run.lease_prompts("w2", 1, 10.0) == []
        clock.advance(2.0)
        leased = run.lease_prompts("w2", 1, 10.0)
        assert [(t.task_id, t.attempt) for t in leased] == [("t00000", 1)]
        with pytest.raises(LedgerConflictError, match="leased by worker 'w2'"):
            run.complete_prompt("t00000", "w1")
        clock.advance(11.0)
        assert run.lease_prompts("w3", 1, 10.0)[0].attempt == 2
        clock.advance(11.0)
        assert run.lease_prompts("w3", 1, 10.0) == []
        assert run.status().prompts["failed"] == 1

    def test_reclaim_leases_of_a_restarted_worker(self, run: Ledger) -> None:
        run.add_prompts([make_task(i) for i in range(3)])
        run.lease_prompts("w1", 2, 30.0)
        run.lease_prompts("w2", 1, 30.0)
        assert run.reclaim_leases("w1") == ["t00000", "t00001"]
        assert run.status().prompts == {"pending": 2, "leased": 1, "done": 0, "failed": 0}
        assert [t.attempt for t in run.lease_prompts("w1", 5, 30.0)] == [1, 1]

    def test_commit_finishes_the_source_prompt(self, run: Ledger) -> None:
        run.add_prompts([make_task(0), make_task(1)])
        run.lease_prompts("w1", 2, 30.0)
        run.commit([make_ref(0, task="t00000"), make_ref(1, task="t09999")])
        assert run.status().prompts == {"pending": 0, "leased": 1, "done": 1, "failed": 0}
        assert run.complete_prompt("t00000", "w1") is PromptState.DONE

    def test_bad_prompt_arguments(self, run: Ledger) -> None:
        before = run.status()
        with pytest.raises(InvalidInputError, match=r"tasks\[0\] must be a PromptTask"):
            run.add_prompts(["t1"])  # type: ignore[list-item]
        with pytest.raises(InvalidInputError, match="lease_s"):
            run.lease_prompts("w1", 1, 0.0)
        with pytest.raises(InvalidInputError, match="worker id"):
            run.lease_prompts("a/b", 1, 1.0)
        assert run.status() == before

    # -- weights ------------------------------------------------------------------------
    def test_weight_registry_orders_and_is_idempotent(self, run: Ledger, uri: str) -> None:
        v1 = run.publish_weight(WeightVersion("draft-1", step=10))
        v2 = run.publish_weight(WeightVersion("draft-2", step=20, location="/ckpt/20"))
        assert (v1.publish_order, v2.publish_order) == (1, 2)
        assert run.publish_weight(WeightVersion("draft-1", step=10)) == v1
        with pytest.raises(LedgerConflictError, match="different fields"):
            run.publish_weight(WeightVersion("draft-1", step=11))
        assert run.weight_versions() == [v1, v2]
        assert run.status().latest_weight_order == 2
        reopened = open_ledger(uri)
        try:
            assert reopened.weight_versions() == [v1, v2]
        finally:
            reopened.close()

    # -- reopen and close ---------------------------------------------------------------
    def test_state_survives_reopen(self, run: Ledger, uri: str) -> None:
        run.ack(1, self._window(run, 0))
        run.add_prompts([make_task(0)])
        run.commit(make_refs(4, 2))
        before = run.status()
        run.close()
        reopened = open_ledger(uri)
        try:
            assert reopened.status() == before
            assert reopened.open_run("run-1", self.QUANTUM, resume=True).trained_step == 1
            assert reopened.refs(["s00004"]) == [make_ref(4)]
        finally:
            reopened.close()

    def test_closed_ledger_refuses_calls(self, ledger: Ledger) -> None:
        ledger.close()
        with pytest.raises(ClosedError):
            ledger.status()
