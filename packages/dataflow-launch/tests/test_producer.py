from __future__ import annotations

import threading
import time

import pytest
import torch
from launch_helpers import ObservedEngine, make_tasks

from dataflow.contracts import (
    NotFoundError,
    PromptTask,
    RunFailedError,
    WeightVersion,
)
from dataflow.control import open_ledger
from dataflow.control.flow import FlowLimits
from dataflow.control.gate import StalenessAdmission
from dataflow.control.staleness import StalenessPolicy, WeightRegistry
from dataflow.launch.engines import FEATURE_NAMES
from dataflow.launch.producer import ProducerSettings, RolloutProducer
from dataflow.store import open_store

RUN = "run1"


@pytest.fixture
def ledger():
    ledger = open_ledger("memory://", max_prompt_attempts=3)
    yield ledger
    ledger.close()


@pytest.fixture
def store():
    store = open_store("memory://")
    yield store
    store.close()


def producer_for(ledger, store, engine, **kw):
    flow = kw.pop("flow_limits", None)
    admission = kw.pop("admission", None)
    draft = kw.pop("draft_version", lambda: None)
    settings = ProducerSettings(
        run_id=RUN, quantum=kw.pop("quantum", 2), prompts_per_lease=kw.pop("lease", 2), **kw
    )
    producer = RolloutProducer(
        ledger, store, engine, settings, flow_limits=flow, admission=admission, draft_version=draft
    )
    producer.open()
    return producer


def counts(ledger):
    status = ledger.status()
    return dict(status.samples), dict(status.prompts)


def test_every_prompt_is_committed_once_with_provenance(ledger, store, tiny_engine):
    tasks = make_tasks(tiny_engine, 6, prefix=RUN)
    producer = producer_for(ledger, store, tiny_engine, workers=2)
    assert producer.ingest(tasks).committed == tuple(t.task_id for t in tasks)
    report = producer.run()
    assert report.outcome == "closed" and report.committed == 6
    samples, prompts = counts(ledger)
    assert samples["committed"] == 6 and prompts["done"] == 6 and prompts["pending"] == 0
    assert ledger.markers().producer.value == "closed"
    refs = ledger.refs([t.task_id for t in tasks])
    for task, ref in zip(tasks, refs, strict=True):
        n = len(task.payload["input_ids"])
        assert ref.sample_id == ref.source_task_id == task.task_id
        assert (ref.run_id, ref.target_version, ref.num_tokens) == (
            RUN,
            tiny_engine.info.version,
            n,
        )
        assert ref.estimated_bytes == sum(s.nbytes for s in tiny_engine.feature_specs(n).values())
        tensors, handle = store.get(ref)
        expected = tiny_engine.capture([task])[0]
        assert tensors["input_ids"].tolist() == expected.tensors["input_ids"].tolist()
        torch.testing.assert_close(
            tensors["aux_hidden_state"], expected.tensors["aux_hidden_state"]
        )
        assert set(tensors) == set(FEATURE_NAMES)
        store.release(handle)
    assert report.tokens == sum(r.num_tokens for r in refs)


def test_passes_give_new_sample_ids(ledger, store, tiny_engine):
    from dataflow.launch.config import DataSection
    from dataflow.launch.data import build_tasks, load_prompts

    prompts = load_prompts(DataSection(max_prompts=3, max_length=48), tiny_engine.tokenizer)
    tasks = build_tasks(prompts.prompts, run_id=RUN, passes=2, max_length=48)
    producer = producer_for(ledger, store, tiny_engine)
    producer.ingest(tasks)
    producer.run()
    refs = ledger.refs([t.task_id for t in tasks])
    assert len({r.sample_id for r in refs}) == 6
    assert [r.metadata["pass"] for r in refs] == [0, 0, 0, 1, 1, 1]


def test_restart_on_the_same_ledger_continues_where_it_stopped(ledger, store, tiny_engine):
    tasks = make_tasks(tiny_engine, 8, prefix=RUN)
    first_engine = ObservedEngine(tiny_engine)
    first = producer_for(ledger, store, first_engine, lease=2)
    first_engine.on_capture = lambda eng: first.stop() if eng.calls >= 2 else None
    first.ingest(tasks)
    report = first.run()
    assert report.outcome == "stopped"
    done_before = counts(ledger)[1]["done"]
    assert 2 <= done_before < 8 and counts(ledger)[1]["leased"] == 0
    assert ledger.markers().producer.value == "running"

    second_engine = ObservedEngine(tiny_engine)
    second = producer_for(ledger, store, second_engine, lease=2)
    again = second.ingest(tasks)
    assert again.committed == () and len(again.duplicates) == 8
    assert second.run().outcome == "closed"
    committed_first = {r.sample_id for r in ledger.refs([t.task_id for t in tasks])}
    assert committed_first == {t.task_id for t in tasks}
    # Nothing the first run committed was captured again.
    assert not set(second_engine.captured) & set(first_engine.captured[:done_before])
    assert counts(ledger)[0]["committed"] == 8


def test_transient_capture_failure_is_retried(ledger, store, tiny_engine):
    tasks = make_tasks(tiny_engine, 3, prefix=RUN)
    engine = ObservedEngine(tiny_engine, fail_first=1)
    producer = producer_for(ledger, store, engine, lease=3, worker_max_failures=2)
    producer.ingest(tasks)
    report = producer.run()
    assert report.outcome == "closed" and report.committed == 3
    assert report.workers[0].failures == 1 and not report.workers[0].dropped
    assert {r.metadata["attempt"] for r in ledger.refs([t.task_id for t in tasks])} == {1}


def test_all_workers_failing_is_a_run_failure_and_nothing_leaks(ledger, store, tiny_engine):
    tasks = make_tasks(tiny_engine, 4, prefix=RUN)
    engine = ObservedEngine(tiny_engine, fail_always=True)
    producer = producer_for(ledger, store, engine, workers=2, lease=1, worker_max_failures=2)
    producer.ingest(tasks)
    with pytest.raises(RunFailedError, match=r"all 2 producer workers failed .*injected capture"):
        producer.run()
    markers = ledger.markers()
    assert markers.producer.value == "failed"
    assert "all 2 producer workers failed" in markers.producer_reason
    samples, prompts = counts(ledger)
    assert samples["committed"] == 0 and prompts["leased"] == 0
    assert prompts["pending"] + prompts["failed"] == 4
    assert store.health().resident_samples == 0
    assert all(w.dropped and w.failures == 2 for w in (x.report() for x in producer.workers))


def test_one_dropped_worker_does_not_stop_the_others(ledger, store, tiny_engine):
    tasks = make_tasks(tiny_engine, 6, prefix=RUN)
    # Each failing call comes from a different worker (one failure drops it): two of the three
    # workers are dropped, the third finishes the pool.
    engine = ObservedEngine(tiny_engine, fail_first=2)
    producer = producer_for(ledger, store, engine, workers=3, lease=1, worker_max_failures=1)
    producer.ingest(tasks)
    report = producer.run()
    assert report.outcome == "closed" and report.committed == 6
    assert sorted(w.dropped for w in report.workers) == [False, True, True]
    assert counts(ledger)[0]["committed"] == 6


def test_bad_prompt_fails_alone_without_blaming_the_worker(ledger, store, tiny_engine):
    good = make_tasks(tiny_engine, 3, prefix=RUN)
    bad = PromptTask(f"{RUN}-bad", {"input_ids": [1, 10**9]}, max_length=8)
    producer = producer_for(ledger, store, tiny_engine, lease=4, max_failed_prompts=1)
    producer.ingest([good[0], bad, *good[1:]])
    report = producer.run()
    assert report.outcome == "closed"
    assert report.committed == 3 and report.workers[0].rejected == 1
    assert report.workers[0].failures == 0
    assert counts(ledger)[1]["failed"] == 1


def test_failed_prompts_over_the_limit_fail_the_run(ledger, store, tiny_engine):
    bad = PromptTask(f"{RUN}-bad", {"input_ids": [1, 10**9]}, max_length=8)
    producer = producer_for(ledger, store, tiny_engine)
    producer.ingest([bad, *make_tasks(tiny_engine, 2, prefix=RUN)])
    with pytest.raises(RunFailedError, match=r"1 prompt\(s\) failed for good, over the limit of 0"):
        producer.run()
    assert ledger.markers().producer.value == "failed"
    assert counts(ledger)[0]["committed"] == 2


def test_retries_stop_at_the_ledgers_maximum(ledger, store, tiny_engine):
    # Capture fails every time, the worker tolerates it: each attempt goes back to PENDING
    # until the ledger's max_prompt_attempts (3) marks the prompt FAILED.
    engine = ObservedEngine(tiny_engine, fail_always=True)
    producer = producer_for(ledger, store, engine, lease=1, worker_max_failures=100)
    producer.ingest(make_tasks(tiny_engine, 1, prefix=RUN))
    with pytest.raises(RunFailedError, match=r"1 prompt\(s\) failed for good.*injected capture"):
        producer.run()
    assert engine.calls == 3
    assert counts(ledger)[1]["failed"] == 1 and counts(ledger)[0]["committed"] == 0


def test_backpressure_pauses_the_producer_until_the_trainer_drains(ledger, store, tiny_engine):
    tasks = make_tasks(tiny_engine, 10, prefix=RUN)
    limits = FlowLimits(high_refs=4, low_refs=2)
    producer = producer_for(ledger, store, tiny_engine, lease=1, flow_limits=limits)
    producer.ingest(tasks)
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(producer.run()), daemon=True)
    thread.start()
    max_in_flight, step, deadline = 0, 0, time.monotonic() + 60
    while thread.is_alive() and time.monotonic() < deadline:
        status = ledger.status()
        max_in_flight = max(max_in_flight, status.in_flight)
        if status.in_flight < 4 and status.prompts["pending"] + status.prompts["leased"] > 0:
            time.sleep(0.01)  # let the producer fill up to its high watermark
            continue
        time.sleep(0.3)  # a slow trainer: the producer reaches the watermark and must wait
        window = ledger.assign_window(1, 2)
        if window is None:
            time.sleep(0.01)
            continue
        for ref in ledger.refs(list(window.assignments[0])):
            _, handle = store.get(ref)
            store.release(handle)
        ledger.ack(step, list(window.assignments[0]))
        step += 1
    thread.join(timeout=10)
    assert outcome and outcome[0].outcome == "closed"
    assert max_in_flight <= 4
    assert producer.side.flow is not None and producer.side.flow.snapshot().pauses >= 1
    assert ledger.status().samples["committed"] + ledger.status().samples["trained"] == 10


def test_staleness_admission_holds_rollouts_until_the_draft_is_fresh(ledger, store, tiny_engine):
    tasks = make_tasks(tiny_engine, 2, prefix=RUN)
    for i, vid in enumerate(("d1", "d2", "d3")):
        ledger.publish_weight(WeightVersion(vid, step=i))
    current = {"version": "d1"}

    def admission(led):
        return StalenessAdmission(
            led,
            WeightRegistry(led),
            StalenessPolicy(max_draft_lag=0),
            tiny_engine.info.version,
            quantum=2,
        )

    producer = producer_for(
        ledger, store, tiny_engine, admission=admission, draft_version=lambda: current["version"]
    )
    producer.ingest(tasks)
    thread = threading.Thread(target=producer.run, daemon=True)
    thread.start()
    time.sleep(0.3)
    assert counts(ledger)[1]["pending"] == 2  # refused: d1 is two publishes behind
    current["version"] = "d3"
    thread.join(timeout=30)
    refs = ledger.refs([t.task_id for t in tasks])
    assert {r.draft_weight_version for r in refs} == {"d3"}
    assert ledger.markers().producer.value == "closed"


def test_a_producer_held_back_stops_with_the_consumers_failure(ledger, store, tiny_engine):
    from dataflow.contracts import ConsumerState, ProducerState

    tasks = make_tasks(tiny_engine, 10, prefix=RUN)
    producer = producer_for(
        ledger, store, tiny_engine, lease=1, flow_limits=FlowLimits(high_refs=4, low_refs=2)
    )
    producer.ingest(tasks)
    ledger.set_consumer_state(ConsumerState.RUNNING)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            producer.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while ledger.status().in_flight < 4 and time.monotonic() < deadline:
        time.sleep(0.01)  # the producer fills up to its high watermark, then waits
    assert thread.is_alive()
    ledger.set_consumer_state(ConsumerState.FAILED, "trainer crashed at step 7")
    thread.join(timeout=30)
    assert not thread.is_alive(), "the producer kept waiting for a failed consumer"
    (error,) = errors
    assert isinstance(error, RunFailedError)
    assert "consumer FAILED" in str(error) and "trainer crashed at step 7" in str(error)
    status = ledger.status()
    assert status.markers.producer is ProducerState.FAILED
    assert status.samples["committed"] == 4  # what it made stays committed for a resumed run


def _spy_commits(ledger, monkeypatch, fail: BaseException | None = None):
    """Record the size of every ledger commit (the real commit still runs unless ``fail``)."""
    sizes: list[int] = []
    real = ledger.commit

    def commit(refs):
        sizes.append(len(refs))
        if fail is not None:
            raise fail
        return real(refs)

    monkeypatch.setattr(ledger, "commit", commit)
    return sizes


def _same_length_tasks(count: int) -> list[PromptTask]:
    return [
        PromptTask(f"{RUN}-{i}", {"input_ids": [1, 5, 6, 7, 8, 9]}, max_length=8)
        for i in range(count)
    ]


def test_one_engine_batch_is_committed_in_one_transaction(ledger, store, tiny_engine, monkeypatch):
    tasks = make_tasks(tiny_engine, 8, prefix=RUN)
    sizes = _spy_commits(ledger, monkeypatch)
    producer = producer_for(ledger, store, tiny_engine, lease=4)
    producer.ingest(tasks)
    report = producer.run()
    assert report.outcome == "closed" and report.committed == 8
    assert sizes == [4, 4]
    assert counts(ledger)[0]["committed"] == 8 and counts(ledger)[1]["done"] == 8


def test_a_refused_group_commit_aborts_every_sample_of_the_batch(
    ledger, store, tiny_engine, monkeypatch
):
    from dataflow.contracts import LedgerConflictError

    tasks = make_tasks(tiny_engine, 4, prefix=RUN)
    sizes = _spy_commits(ledger, monkeypatch, fail=LedgerConflictError("injected refusal"))
    limits = FlowLimits(high_refs=8)
    producer = producer_for(ledger, store, tiny_engine, lease=4, flow_limits=limits)
    producer.ingest(tasks)
    with pytest.raises(RunFailedError, match="LedgerConflictError: injected refusal"):
        producer.run()
    assert sizes == [4]
    samples, prompts = counts(ledger)
    assert samples["committed"] == 0 and prompts["done"] == 0 and prompts["leased"] == 0
    assert store.health().resident_samples == 0  # all four puts aborted, none half-committed
    assert producer.side.flow is not None and producer.side.flow.snapshot().reserved_bytes == 0


def test_a_group_is_committed_early_when_the_byte_cap_has_no_room(
    ledger, store, tiny_engine, monkeypatch
):
    tasks = _same_length_tasks(8)
    nbytes = sum(s.nbytes for s in tiny_engine.feature_specs(6).values())
    sizes = _spy_commits(ledger, monkeypatch)
    limits = FlowLimits(high_refs=8, max_bytes=2 * nbytes)  # two samples fit, a batch is four
    producer = producer_for(ledger, store, tiny_engine, lease=4, flow_limits=limits)
    producer.ingest(tasks)
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(producer.run()), daemon=True)
    thread.start()
    step, deadline = 0, time.monotonic() + 60
    while thread.is_alive() and time.monotonic() < deadline:
        window = ledger.assign_window(1, 2)
        if window is None:
            time.sleep(0.01)
            continue
        ledger.ack(step, list(window.assignments[0]))
        step += 1
    thread.join(timeout=10)
    assert outcome and outcome[0].outcome == "closed", "the producer waited on its own group"
    assert outcome[0].committed == 8 and outcome[0].workers[0].rejected == 0
    assert max(sizes) <= 2 and sum(sizes) == 8


def test_a_failure_mid_batch_in_the_ledger_commits_nothing_of_the_batch(
    tmp_path, store, tiny_engine
):
    """A real SQLite ledger fails the group's transaction after it inserted part of the batch
    (a trigger refuses the third row): nothing of the batch is committed, its prompts are not
    finished, and every put of the batch is aborted with its bytes freed.
    """
    import sqlite3

    path = tmp_path / "ledger.db"
    ledger = open_ledger(f"sqlite://{path}")
    tasks = make_tasks(tiny_engine, 4, prefix=RUN)
    limits = FlowLimits(high_refs=8)
    producer = producer_for(ledger, store, tiny_engine, lease=4, flow_limits=limits)
    producer.ingest(tasks)
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TRIGGER fail_mid_batch BEFORE INSERT ON samples "
        f"WHEN NEW.id = '{tasks[2].task_id}' "
        "BEGIN SELECT RAISE(ABORT, 'injected failure mid-batch'); END"
    )
    conn.commit()
    conn.close()
    try:
        with pytest.raises(RunFailedError, match="injected failure mid-batch"):
            producer.run()
        samples, prompts = counts(ledger)
        assert samples["committed"] == 0 and prompts["done"] == 0
        assert prompts["pending"] == 4 and prompts["leased"] == 0  # handed back, not consumed
        for task in tasks:
            with pytest.raises(NotFoundError):
                ledger.refs([task.task_id])
        assert store.health().resident_samples == 0  # all four puts aborted
        assert producer.side.flow is not None and producer.side.flow.snapshot().reserved_bytes == 0
    finally:
        ledger.close()
