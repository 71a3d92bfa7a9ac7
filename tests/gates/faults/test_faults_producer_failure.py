"""A producer failure is never read as the end of the stream.

1. The real producer fails for good (its store refuses every put: a budget smaller than one
   sample, so each worker is dropped after its failures and the producer marks the run FAILED
   with the reason): the real consumer process exits with a failure whose one error line names
   the producer's reason, and nothing it had not trained is reported as trained.
2. The producer is SIGKILLed and not restarted: the consumer trains what was committed and then
   keeps waiting; it never finishes as if the stream had ended.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
from gate_runs import (
    Job,
    cleanup_segments,
    consumer,
    ledger_status,
    producer,
    shm_samples,
    shm_segments,
    trained_steps,
    wait_until,
)


@dataclass(frozen=True)
class FailedRun:
    job: Job
    producer_code: int
    consumer_code: int
    consumer_output: str


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory: pytest.TempPathFactory) -> FailedRun:
    """A run whose store refuses every put (budget below one sample): the producer fails."""
    job = Job(
        tmp_path_factory.mktemp("failed") / "run",
        8,
        extra=("store.options.budget_bytes=1024", "producer.worker_max_failures=2"),
    )
    prod, cons = producer(job), consumer(job)
    try:
        producer_code = prod.wait(300)
        consumer_code = cons.wait(300)
    finally:
        prod.kill()
        cons.kill()
    return FailedRun(job, producer_code, consumer_code, cons.output())


def test_failed_producer_is_a_consumer_failure_not_end_of_stream(failed_run, summary):
    assert failed_run.producer_code == 2
    status = ledger_status(failed_run.job.ledger)
    assert status.markers.producer == "failed", status.markers
    reason = status.markers.producer_reason
    assert "producer workers failed" in reason and "CapacityExceededError" in reason, reason
    code, output = failed_run.consumer_code, failed_run.consumer_output
    assert code == 2, f"consumer exited {code} after the producer failed; log:\n{output}"
    lines = [ln for ln in output.splitlines() if ln.startswith("dataflow-launch consume: error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    assert trained_steps(failed_run.job.trained_log) == []
    assert shm_segments(failed_run.job.store_name) == []
    summary.append(
        f"faults/producer-failure: producer FAILED ({reason[:90]}...); consumer exit {code}: "
        f"{lines[0][:120]}"
    )


def test_consumer_error_names_the_producers_reason(failed_run):
    lines = [
        ln
        for ln in failed_run.consumer_output.splitlines()
        if ln.startswith("dataflow-launch consume: error:")
    ]
    assert lines and "producer workers failed" in lines[-1], lines
    status = ledger_status(failed_run.job.ledger)
    assert status.markers.consumer == "failed", status.markers


def test_killed_producer_is_not_end_of_stream(tmp_path, summary):
    # Low watermarks hold the producer to a few samples ahead of the trainer, so it is still
    # mid-stream when killed: on an idle machine an unthrottled producer finished all of a small
    # prompt set (and closed the stream) before the kill landed, which proves nothing.
    job = Job(tmp_path / "run", 64, extra=("flow.high_watermark=4", "flow.low_watermark=2"))
    prod, cons = producer(job), consumer(job)
    try:
        assert wait_until(lambda: shm_samples(job.store_name) >= 3, 240), prod.output()
        prod.kill()
        marker = ledger_status(job.ledger).markers.producer
        assert marker == "running", f"the producer ended ({marker}) before the kill: no test"
        # The consumer trains every whole window that was committed, then must keep waiting.
        committed = sum(ledger_status(job.ledger).samples.values())
        assert wait_until(
            lambda: ledger_status(job.ledger).samples["committed"] < 2 or cons.poll() is not None,
            240,
        )
        time.sleep(5.0)
        assert cons.poll() is None, f"consumer ended without a stream end:\n{cons.output()}"
        status = ledger_status(job.ledger)
        assert status.markers.producer == "running" and status.markers.consumer == "running"
        steps = len(trained_steps(job.trained_log))
    finally:
        cons.kill()
        prod.kill()
        cleanup_segments([job.store_name])  # the unfinished run's features: this test's to free
    summary.append(
        f"faults/producer-killed: {committed} committed before the kill, consumer trained "
        f"{steps} steps and was still waiting 5s later (not read as end of stream)"
    )
