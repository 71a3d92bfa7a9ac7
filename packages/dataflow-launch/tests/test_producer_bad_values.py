"""The producer never puts a sample with bad feature values (issue 18 item 2): a real HF target
whose weights are NaN, and samples longer than the run's length, fail their prompts for good with
the reason; nothing is put, the worker is not blamed, and the run fails past the threshold.
"""

from __future__ import annotations

import pytest
import torch
from launch_helpers import make_tasks

from dataflow.contracts import RunFailedError
from dataflow.control import open_ledger
from dataflow.launch.engines import CapturedSample
from dataflow.launch.engines.hf import open_hf_engine
from dataflow.launch.producer import ProducerSettings, RolloutProducer
from dataflow.store import open_store

RUN = "badv"


@pytest.fixture
def nan_engine(tiny_target):
    engine = open_hf_engine(tiny_target)
    with torch.no_grad():
        for param in engine.model.parameters():
            param.fill_(float("nan"))
    yield engine
    engine.close()


def _produce(engine, settings_kw, tasks):
    ledger = open_ledger("memory://", max_prompt_attempts=3)
    store = open_store("memory://")
    settings = ProducerSettings(run_id=RUN, quantum=2, prompts_per_lease=2, **settings_kw)
    producer = RolloutProducer(ledger, store, engine, settings)
    producer.open()
    producer.ingest(tasks)
    return ledger, store, producer


def test_nan_hidden_states_fail_every_prompt_for_good_and_nothing_is_put(nan_engine):
    tasks = make_tasks(nan_engine, 3, prefix=RUN)
    ledger, store, producer = _produce(nan_engine, {"max_failed_prompts": 3}, tasks)
    report = producer.run()
    assert report.outcome == "closed" and report.committed == 0
    assert sum(w.rejected for w in report.workers) == 3
    assert all(w.failures == 0 and not w.dropped for w in report.workers)
    status = ledger.status()
    assert status.prompts["failed"] == 3 and status.samples["committed"] == 0
    assert store.health().resident_samples == 0


def test_nan_past_the_threshold_fails_the_run(nan_engine):
    tasks = make_tasks(nan_engine, 2, prefix=RUN)
    ledger, _store, producer = _produce(nan_engine, {}, tasks)
    with pytest.raises(RunFailedError, match="failed for good"):
        producer.run()
    assert ledger.markers().producer.value == "failed"


def test_a_sample_longer_than_max_length_is_refused_before_the_put(tiny_engine):
    tasks = make_tasks(tiny_engine, 2, prefix=RUN)
    shortest = min(len(t.payload["input_ids"]) for t in tasks)
    ledger, store, producer = _produce(
        tiny_engine, {"max_failed_prompts": 2, "max_length": shortest - 1}, tasks
    )
    report = producer.run()
    assert report.committed == 0 and sum(w.rejected for w in report.workers) == 2
    assert store.health().resident_samples == 0
    assert ledger.status().prompts["failed"] == 2


class _UncheckedNaNEngine:
    """A real hf engine whose samples reach the producer unchecked (as a custom engine's may),
    one of them with a NaN: the worker must read their values itself.
    """

    def __init__(self, engine):
        self._engine = engine
        self.info = engine.info

    def feature_specs(self, num_tokens):
        return self._engine.feature_specs(num_tokens)

    def capture(self, tasks):
        samples = self._engine.capture(tasks)
        out = []
        for sample in samples:
            tensors = {k: v.clone() for k, v in sample.tensors.items()}
            if sample.task_id.endswith("0"):
                tensors["aux_hidden_state"][0, -1, 0] = float("inf")
            out.append(CapturedSample(sample.task_id, tensors))
        return out


def test_an_unchecked_sample_has_its_values_read_by_the_worker(tiny_engine):
    engine = _UncheckedNaNEngine(tiny_engine)
    tasks = make_tasks(tiny_engine, 2, prefix=RUN)
    assert [t.task_id[-1] for t in tasks] == ["0", "1"]
    ledger, store, producer = _produce(engine, {"max_failed_prompts": 1}, tasks)
    report = producer.run()
    assert report.committed == 1 and sum(w.rejected for w in report.workers) == 1
    assert ledger.status().prompts["failed"] == 1
    assert store.health().resident_samples == 1
    (fine,) = [t for t in tasks if t.task_id.endswith("1")]
    assert [ref.sample_id for ref in ledger.refs([fine.task_id])] == [fine.task_id]
