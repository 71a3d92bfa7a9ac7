"""The controller over a real (memory://) ledger: dispatch, queues, ack, release, reconcile."""

from __future__ import annotations

import pytest
from control_fixtures import ResidentFeatures, make_ref, make_refs, memory_uri
from dataflow_testing.thread_collective import ThreadCollective, run_ranks

from dataflow.contracts import PromptTask, RefQueue, WeightVersion
from dataflow.contracts.errors import (
    ClosedError,
    InvalidInputError,
    LedgerConflictError,
    RunFailedError,
)
from dataflow.control.consumer import ConsumerSide
from dataflow.control.controller import Controller
from dataflow.control.flow import FlowLimits
from dataflow.control.gate import StalenessAdmission
from dataflow.control.ledger import open_ledger
from dataflow.control.staleness import StalenessPolicy, WeightRegistry
from dataflow.control.window import WindowShape


@pytest.fixture
def features():
    return ResidentFeatures()


@pytest.fixture
def controller(features):
    controller = Controller.open(memory_uri(), aborter=features)
    yield controller
    controller.close()


def produce(controller: Controller, features: ResidentFeatures, count: int, *, close=True):
    producer = controller.producer()
    producer.open("run-1", resume=True)
    refs = make_refs(0, count)
    features.put(refs)
    producer.commit(refs)
    if close:
        producer.close()
    return producer


def acked_two_steps(controller: Controller, features: ResidentFeatures) -> ConsumerSide:
    """A one-sample-window consumer of run-1 that trained and acked steps 0 and 1 of 3 samples."""
    side = controller.consumer(WindowShape(dp_size=1, batch_size=1))
    side.open("run-1")
    produce(controller, features, 3)
    queue = side.queue()
    for step in range(2):
        side.ack(step, [queue.get(timeout=1).sample_id])
    return side


def take_window(queue: RefQueue, per_rank: int) -> list[str] | None:
    """One rank's share of the next window (None at end of stream)."""
    ids = []
    for _ in range(per_rank):
        ref = queue.get(timeout=5)
        if ref is None:
            assert ids == [], "the stream ended inside a window"
            return None
        ids.append(ref.sample_id)
    return ids


def train(side: ConsumerSide, log: list, *, first_step=0, checkpoint=True, max_steps=None):
    """A trainer rank's loop: window → ack → (checkpoint durable)."""
    queue, step = side.queue(), first_step
    while max_steps is None or step < first_step + max_steps:
        ids = take_window(queue, side.shape.per_rank)
        if ids is None:
            return step
        side.ack(step, ids)
        log.append((side.rank, step, tuple(ids)))
        if checkpoint:
            side.checkpoint_durable(step)
        step += 1
    return step


def test_each_rank_gets_exactly_its_share_per_window_and_the_tail_is_dropped(controller, features):
    shape = WindowShape(dp_size=2, batch_size=2, accumulation_steps=1)
    controller.consumer(shape).open("run-1")
    produce(controller, features, 11)  # 2 windows of 4, tail of 3
    log: list = []

    def rank_fn(collective: ThreadCollective) -> int:
        side = controller.consumer(shape, rank=collective.rank, collective=collective)
        assert isinstance(side.queue(), RefQueue)
        return train(side, log)

    assert run_ranks(2, rank_fn) == [2, 2]
    by_step: dict[int, list[str]] = {}
    for _rank, step, ids in sorted(log):
        assert len(ids) == shape.per_rank
        by_step.setdefault(step, []).extend(ids)
    assert by_step == {
        0: ["s00000", "s00001", "s00002", "s00003"],
        1: ["s00004", "s00005", "s00006", "s00007"],
    }
    status = controller.status()
    assert status.samples["released"] == 8
    assert status.samples["dropped"] == 3 and dict(status.dropped_reasons) == {"partial_window": 3}
    assert status.in_flight == 0 and status.in_flight_bytes == 0
    assert features.resident == set()
    reasons = features.reasons()
    assert {reasons[f"s{i:05d}"] for i in range(8, 11)} == {"partial_window"}
    assert {reasons[f"s{i:05d}"] for i in range(8)} == {"trained"}


def test_a_window_opens_only_when_it_can_be_completed(controller, features):
    shape = WindowShape(dp_size=1, batch_size=2, accumulation_steps=2)
    side = controller.consumer(shape)
    side.open("run-1")
    producer = produce(controller, features, 3, close=False)
    queue = side.queue()
    with pytest.raises(TimeoutError, match="nothing to hand out within 0.05s"):
        queue.get(timeout=0.05)
    assert controller.status().samples["assigned"] == 0
    producer.commit([make_ref(3)])
    assert [queue.get(timeout=1).sample_id for _ in range(4)] == [f"s{i:05d}" for i in range(4)]


def test_producer_failure_is_an_error_never_an_end_of_stream(controller, features):
    shape = WindowShape(dp_size=1, batch_size=2)
    side = controller.consumer(shape)
    side.open("run-1")
    producer = produce(controller, features, 2, close=False)
    queue = side.queue()
    assert [queue.get(timeout=1).sample_id for _ in range(2)] == ["s00000", "s00001"]
    producer.fail("target engine crashed: CUDA OOM")
    for _ in range(2):  # every later call raises again; it never returns None
        with pytest.raises(RunFailedError, match=r"producer failed \(target engine crashed"):
            queue.get(timeout=1)


def test_producer_failure_with_a_partial_tail_still_raises(controller, features):
    side = controller.consumer(WindowShape(dp_size=1, batch_size=4))
    side.open("run-1")
    producer = produce(controller, features, 3, close=False)
    producer.fail("dataset unreadable")
    with pytest.raises(RunFailedError, match="dataset unreadable"):
        side.queue().get(timeout=1)
    assert controller.status().samples["committed"] == 3  # the tail is not dropped on failure


def test_a_failed_consumer_rank_stops_every_other_rank(controller, features):
    shape = WindowShape(dp_size=2, batch_size=1)
    rank0, rank1 = (controller.consumer(shape, rank=r) for r in (0, 1))
    rank0.open("run-1")
    produce(controller, features, 4, close=False)
    assert rank0.queue().get(timeout=1).sample_id == "s00000"
    rank0.fail("rank 0: NaN loss")
    with pytest.raises(RunFailedError, match=r"consumer side failed \(rank 0: NaN loss\)"):
        rank1.queue().get(timeout=1)


def test_idle_timeout_applies_to_every_get(controller, features):
    side = controller.consumer(WindowShape(dp_size=1, batch_size=2), idle_timeout_s=0.05)
    side.open("run-1")
    produce(controller, features, 1, close=False)
    with pytest.raises(TimeoutError, match="within 0.05s"):
        side.queue().get()


def test_a_closed_queue_refuses_further_gets(controller, features):
    side = controller.consumer(WindowShape(dp_size=1, batch_size=1))
    side.open("run-1")
    produce(controller, features, 1)
    queue = side.queue()
    queue.close()
    with pytest.raises(ClosedError, match="closed"):
        queue.get(timeout=1)


def test_end_of_stream_is_clean_only_after_close_and_drain(controller, features):
    side = controller.consumer(WindowShape(dp_size=1, batch_size=2))
    side.open("run-1")
    produce(controller, features, 2)
    queue = side.queue()
    assert [queue.get(timeout=1).sample_id for _ in range(2)] == ["s00000", "s00001"]
    assert queue.get(timeout=1) is None
    assert queue.get(timeout=1) is None
    side.ack(0, ["s00000", "s00001"])
    side.finish()
    assert controller.status().markers.consumer == "done"


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (["s09999"], "unknown sample id 's09999'"),
        (["s00002"], "'s00002' is committed but not assigned"),
        (["s00000"], "'s00000' was already trained at step 0"),
    ],
)
def test_bad_acks_are_refused_and_change_nothing(controller, features, ids, message):
    side = controller.consumer(WindowShape(dp_size=1, batch_size=2))
    side.open("run-1")
    produce(controller, features, 3, close=False)
    queue = side.queue()
    first = [queue.get(timeout=1).sample_id for _ in range(2)]
    side.ack(0, first)
    before = controller.status()
    resident = set(features.resident)
    with pytest.raises(LedgerConflictError, match=message):
        side.ack(1, ids)
    assert controller.status() == before
    assert features.resident == resident


def test_a_step_going_backwards_is_refused_and_changes_nothing(controller, features):
    side = controller.consumer(WindowShape(dp_size=1, batch_size=1))
    side.open("run-1")
    produce(controller, features, 2)
    queue = side.queue()
    side.ack(5, [queue.get(timeout=1).sample_id])
    ref = queue.get(timeout=1)
    before = controller.status()
    with pytest.raises(LedgerConflictError, match="step 4 is behind the last acked step 5"):
        side.ack(4, [ref.sample_id])
    with pytest.raises(InvalidInputError, match="step must be an int >= 0, got -1"):
        side.ack(-1, [ref.sample_id])
    assert controller.status() == before


class RecordingCollective(ThreadCollective):
    """A thread rank that records what it broadcasts (to see what crosses ranks)."""

    def __init__(self, inner: ThreadCollective, sent: list) -> None:
        super().__init__(inner._group, inner.rank)
        self._sent = sent

    def broadcast_object(self, obj, src=0):
        result = super().broadcast_object(obj, src)
        self._sent.append((self.rank, result))
        return result


def test_checkpoint_durable_broadcasts_no_refs_and_each_rank_frees_its_own(controller, features):
    shape = WindowShape(dp_size=2, batch_size=2, accumulation_steps=1)
    controller.consumer(shape).open("run-1")
    produce(controller, features, 8)
    sent: list = []
    freed: dict[int, list[str]] = {}

    def rank_fn(collective: ThreadCollective) -> int:
        recording = RecordingCollective(collective, sent)
        side = controller.consumer(shape, rank=collective.rank, collective=recording)
        queue, own = side.queue(), []
        for step in range(2):
            ids = take_window(queue, shape.per_rank)
            assert ids is not None
            own.extend(ids)
            side.ack(step, ids)
        if collective.rank == 0:
            sent.clear()  # keep only what the checkpoint sends
        collective.barrier()
        freed[collective.rank] = side.checkpoint_durable(1)
        assert sorted(freed[collective.rank]) == sorted(own)
        return len(own)

    assert run_ranks(2, rank_fn) == [4, 4]
    # the durable-step write and the release: each broadcast only an ok flag, never refs
    assert sorted(sent) == [(r, (True, None)) for r in (0, 0, 1, 1)]
    assert sorted(freed[0] + freed[1]) == [f"s{i:05d}" for i in range(8)]
    assert controller.status().samples["released"] == 8
    assert features.resident == set()


def test_on_checkpoint_frees_features_only_once_a_checkpoint_covers_them(controller, features):
    side = controller.consumer(WindowShape(dp_size=1, batch_size=2))
    side.open("run-1")
    produce(controller, features, 6)
    queue = side.queue()
    for step in range(3):
        side.ack(step, [queue.get(timeout=1).sample_id for _ in range(2)])
    assert features.resident == {f"s{i:05d}" for i in range(6)}
    assert controller.status().samples["trained"] == 6
    assert side.checkpoint_durable(1) == ["s00000", "s00001", "s00002", "s00003"]
    status = controller.status()
    assert (status.samples["released"], status.samples["trained"]) == (4, 2)
    assert status.markers.durable_step == 1
    assert features.resident == {"s00004", "s00005"}


def test_on_ack_frees_at_ack_and_then_refuses_a_resume_that_needs_the_gap(features):
    uri = memory_uri()
    controller = Controller.open(uri, aborter=features)
    side = controller.consumer(WindowShape(dp_size=1, batch_size=2), release="on_ack")
    side.open("run-1")
    produce(controller, features, 6)
    queue = side.queue()
    side.ack(0, [queue.get(timeout=1).sample_id for _ in range(2)])
    side.checkpoint_durable(0)
    side.ack(1, [queue.get(timeout=1).sample_id for _ in range(2)])
    assert features.resident == {"s00004", "s00005"}
    assert controller.status().samples["released"] == 4
    # crash; the newest checkpoint is step 0 but step 1's samples are gone
    restarted = Controller(open_ledger(uri), aborter=features).consumer(
        WindowShape(dp_size=1, batch_size=2), release="on_ack"
    )
    before = controller.status()
    with pytest.raises(LedgerConflictError, match="checkpoint step 0 is behind step 1"):
        restarted.reconcile(0)
    assert controller.status() == before


def test_reconcile_refuses_a_checkpoint_older_than_the_durable_one(controller, features):
    side = acked_two_steps(controller, features)
    side.checkpoint_durable(0)  # releases step 0
    side.checkpoint_durable(1)  # and step 1
    again = controller.consumer(WindowShape(dp_size=1, batch_size=1))
    before = controller.status()
    with pytest.raises(LedgerConflictError, match="older than the durable checkpoint step 1"):
        again.reconcile(0)
    assert controller.status() == before


def test_restart_reconciles_and_finishes_with_a_different_dp_size(features):
    uri = memory_uri()
    first = Controller.open(uri, aborter=features)
    shape = WindowShape(dp_size=2, batch_size=2)
    first.consumer(shape).open("run-1")
    produce(first, features, 18)  # 4 windows of 4 + a tail of 2
    log: list = []

    def crashed_run(collective: ThreadCollective) -> None:
        side = first.consumer(shape, rank=collective.rank, collective=collective)
        train(side, log, max_steps=1)  # step 0, checkpointed
        train(side, log, first_step=1, max_steps=1, checkpoint=False)  # step 1, not
        take_window(side.queue(), shape.per_rank)  # window 2 assigned, never acked: crash

    run_ranks(2, crashed_run)
    status = first.status()
    assert (status.samples["released"], status.samples["trained"]) == (4, 4)
    assert status.samples["assigned"] == 8  # windows 2 and 3: the dispatcher looks ahead by 2
    # restart on 4 ranks of 1 (same quantum), from the checkpoint of step 0
    new_shape = WindowShape(dp_size=4, batch_size=1)
    second = Controller(open_ledger(uri), aborter=features)
    resumed: list = []

    def resumed_run(collective: ThreadCollective) -> int:
        side = second.consumer(new_shape, rank=collective.rank, collective=collective)
        side.open("run-1", resume=True)
        result = side.reconcile(0)
        assert result.released == () and len(result.requeued) == 12
        again = side.reconcile(0)  # idempotent: nothing left to change
        assert (again.released, again.requeued) == ((), ())
        return train(side, resumed, first_step=1)

    assert run_ranks(4, resumed_run) == [4, 4, 4, 4]
    durable = [ids for _, step, ids in log if step <= 0]
    trained = [sid for ids in durable for sid in ids] + [
        sid for _, _, ids in resumed for sid in ids
    ]
    assert sorted(trained) == [f"s{i:05d}" for i in range(16)]  # exactly once, none lost
    status = second.status()
    assert (status.samples["released"], status.samples["dropped"]) == (16, 2)
    assert status.in_flight == 0 and features.resident == set()
    assert status.markers.dp_size == 4


def test_reconcile_must_come_before_the_queue(controller, features):
    side = controller.consumer(WindowShape(dp_size=1, batch_size=1))
    side.open("run-1")
    side.queue()
    with pytest.raises(InvalidInputError, match="reconcile must run before"):
        side.reconcile(-1)


def test_feature_cleanup_failure_is_reported_after_the_commit(controller, features):
    side = controller.consumer(WindowShape(dp_size=1, batch_size=2), release="on_ack")
    side.open("run-1")
    produce(controller, features, 2)
    features.fail_on = {"s00001"}
    queue = side.queue()
    ids = [queue.get(timeout=1).sample_id for _ in range(2)]
    with pytest.raises(
        Exception, match=r"committed, but freeing features failed: rank 0: .*s00001"
    ):
        side.ack(0, ids)
    assert controller.status().samples["released"] == 2
    assert features.resident == {"s00001"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 2}, "rank 2 is outside dp_size 2"),
        ({"rank": -1}, "rank must be an int >= 0, got -1"),
        ({"release": "sometimes"}, "release policy 'sometimes' is unknown"),
        ({"lookahead": 0}, "lookahead must be an int >= 1, got 0"),
    ],
)
def test_bad_consumer_arguments_are_refused(controller, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        controller.consumer(WindowShape(dp_size=2, batch_size=1), **kwargs)


def test_window_shape_is_validated():
    assert WindowShape(2, 3, 4).quantum == 24
    with pytest.raises(InvalidInputError, match="batch_size must be an int >= 1, got 0"):
        WindowShape(2, 0)


def test_producer_restarted_on_the_ledger_never_reruns_finished_prompts(features):
    uri = memory_uri()
    first = Controller.open(uri).producer()
    first.open("run-1")
    first.ingest([PromptTask(f"p{i}", {"input_ids": [i]}) for i in range(6)])
    leased = first.lease("worker-a", 4, 60.0)
    assert [t.task_id for t in leased] == ["p0", "p1", "p2", "p3"]
    first.commit([make_ref(0, task="p0"), make_ref(1, task="p1")])  # p0, p1 finished
    # the producer dies holding p2, p3; a new one starts on the same ledger
    second = Controller(open_ledger(uri)).producer()
    second.open("run-1", resume=True)
    assert sorted(second.reclaim("worker-a")) == ["p2", "p3"]
    again = second.lease("worker-b", 10, 60.0)
    assert sorted(t.task_id for t in again) == ["p2", "p3", "p4", "p5"]
    assert second.ingest([PromptTask("p0", {"input_ids": [0]})]).duplicates == ("p0",)
    status = Controller(open_ledger(uri)).status()
    assert (status.prompts["done"], status.prompts["leased"]) == (2, 4)


def test_producer_admission_refuses_to_lease_stale_rollouts(controller):
    ledger = controller.ledger
    ledger.open_run("run-1", 2, resume=False)
    registry = WeightRegistry(ledger)
    for step, name in enumerate(("v1", "v2", "v3")):
        registry.publish(WeightVersion(name, step))
    admission = StalenessAdmission(
        ledger, registry, StalenessPolicy(max_draft_lag=1), "target-a", quantum=2
    )
    producer = controller.producer(admission=admission)
    producer.ingest([PromptTask("p0", {"input_ids": [0]})])
    assert producer.lease("w", 1, 60.0, draft_version="v1", target_version="target-a") == []
    assert producer.last_refusal.reasons == ("draft_lag>1",)
    assert controller.status().prompts["pending"] == 1
    leased = producer.lease("w", 1, 60.0, draft_version="v2", target_version="target-a")
    assert [t.task_id for t in leased] == ["p0"]


def test_producer_flow_control_needs_the_quantum(controller):
    with pytest.raises(LedgerConflictError, match="needs the run's quantum"):
        controller.producer(flow_limits=FlowLimits(high_refs=8))
    controller.consumer(WindowShape(dp_size=2, batch_size=2)).open("run-1")
    producer = controller.producer(flow_limits=FlowLimits(high_refs=8))
    assert producer.flow is not None and producer.flow.quantum == 4
    with pytest.raises(InvalidInputError, match="at least one quantum"):
        controller.producer(flow_limits=FlowLimits(high_refs=3))


def test_status_carries_the_gate_drift(controller):
    side = controller.consumer(WindowShape(dp_size=1, batch_size=1))
    assert side.status().drift_mean is None


def test_a_fresh_consumer_on_a_non_empty_ledger_is_refused_and_changes_nothing(
    controller, features
):
    shape = WindowShape(dp_size=1, batch_size=2)
    controller.consumer(shape).open("run-1")
    produce(controller, features, 2, close=False)
    before = controller.status()
    with pytest.raises(LedgerConflictError):
        controller.consumer(shape).open("run-1", resume=False)
    assert controller.status() == before


def test_a_resume_with_another_quantum_is_refused_and_changes_nothing(controller, features):
    controller.consumer(WindowShape(dp_size=2, batch_size=2)).open("run-1")
    produce(controller, features, 4, close=False)
    before = controller.status()
    with pytest.raises(LedgerConflictError, match="quantum"):
        controller.consumer(WindowShape(dp_size=2, batch_size=3)).open("run-1", resume=True)
    assert controller.status() == before
    # another dp_size with the same quantum is fine
    markers = controller.consumer(WindowShape(dp_size=4, batch_size=1)).open("run-1", resume=True)
    assert markers.quantum == 4


def test_reconcile_ahead_of_the_last_ack_frees_nothing_and_changes_nothing(controller, features):
    acked_two_steps(controller, features)
    again = controller.consumer(WindowShape(dp_size=1, batch_size=1))
    before, resident = controller.status(), set(features.resident)
    with pytest.raises(LedgerConflictError, match="checkpoint step 5 is ahead of the last acked"):
        again.reconcile(5)
    assert controller.status() == before
    assert features.resident == resident


@pytest.mark.parametrize("release", ["on_ack", "on_checkpoint"])
def test_each_rank_frees_only_its_own_features(release):
    uri = memory_uri()
    shared = ResidentFeatures()
    controller = Controller.open(uri, aborter=shared)
    shape = WindowShape(dp_size=3, batch_size=1)
    controller.consumer(shape).open("run-1")
    produce(controller, shared, 6)
    per_rank = [ResidentFeatures() for _ in range(3)]
    trained: list = []

    def rank_fn(collective: ThreadCollective) -> int:
        side = ConsumerSide(
            open_ledger(uri),
            shape,
            rank=collective.rank,
            collective=collective,
            aborter=per_rank[collective.rank],
            release=release,
        )
        return train(side, trained)

    assert run_ranks(3, rank_fn) == [2, 2, 2]
    for rank, features in enumerate(per_rank):
        own = {sid for r, _, ids in trained if r == rank for sid in ids}
        assert {sid for sid, _ in features.aborted} == own
        assert len(own) == 2
    assert controller.status().samples["released"] == 6


def test_the_producer_can_wait_for_the_consumers_quantum(controller):
    import threading
    import time

    with pytest.raises(TimeoutError, match="no quantum within 0.05s"):
        controller.wait_for_quantum(0.05, poll_s=0.01)
    opener = threading.Timer(
        0.05, lambda: controller.consumer(WindowShape(dp_size=2, batch_size=3)).open("run-1")
    )
    opener.start()
    start = time.monotonic()
    assert controller.wait_for_quantum(5, poll_s=0.01) == 6
    assert time.monotonic() - start < 2
    opener.join()


def test_waiting_for_the_quantum_fails_when_the_consumer_failed(controller):
    controller.ledger.set_consumer_state("failed", "bad config")
    with pytest.raises(RunFailedError, match=r"consumer failed before setting the quantum \(bad"):
        controller.wait_for_quantum(5, poll_s=0.01)


def test_sequence_parallel_peers_share_their_rank_queue_and_each_sample_is_acked_once(
    controller, features
):
    # dp 2 x sp 2: four processes, two per data-parallel rank; only the first of each group
    # reports its ids (as the trainer's sequence-parallel backend does).
    shape = WindowShape(dp_size=2, batch_size=2, accumulation_steps=1)
    controller.consumer(shape).open("run-1")
    produce(controller, features, 11)  # 2 windows of 4, tail of 3
    seen: dict[int, list[tuple[int, tuple[str, ...]]]] = {}
    acked: list[tuple[int, tuple[str, ...]]] = []

    def rank_fn(collective: ThreadCollective) -> int:
        dp_rank, peer = divmod(collective.rank, 2)
        side = controller.consumer(shape, rank=dp_rank, collective=collective)
        queue, step = side.queue(), 0
        while (ids := take_window(queue, shape.per_rank)) is not None:
            seen.setdefault(collective.rank, []).append((step, tuple(ids)))
            result = side.ack(step, ids if peer == 0 else [])
            if collective.rank == 0:
                acked.append((step, result.all_ids))
            side.checkpoint_durable(step)
            step += 1
        side.finish()
        return step

    assert run_ranks(4, rank_fn) == [2, 2, 2, 2]
    assert seen[0] == seen[1] and seen[2] == seen[3]  # peers: same refs, same order
    assert seen[0] != seen[2]
    assert acked == [
        (0, ("s00000", "s00001", "s00002", "s00003")),
        (1, ("s00004", "s00005", "s00006", "s00007")),
    ]
    status = controller.status()
    assert status.samples["released"] == 8 and status.samples["dropped"] == 3
    assert status.in_flight == 0
    trained = [sid for sid, reason in features.aborted if reason == "trained"]
    assert sorted(trained) == [f"s{i:05d}" for i in range(8)]  # each freed once, not twice
    assert [sid for sid, _ in features.aborted].count("s00008") == 1  # one tail drop
