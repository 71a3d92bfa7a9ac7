"""A producer process SIGKILLed mid-run on a SQLite ledger and a shm:// store, then restarted:
every prompt ends committed exactly once and every committed feature is intact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from launch_helpers import TINY

from dataflow.contracts import InvalidInputError
from dataflow.control import open_ledger
from dataflow.launch.config import load_config
from dataflow.launch.data import build_tasks, load_prompts
from dataflow.launch.engines import FEATURE_NAMES, open_engine
from dataflow.launch.producer import (
    ProducerSettings,
    RolloutProducer,
    build_producer,
    open_config_ledger,
    open_config_store,
)
from dataflow.store import open_store

CHILD = Path(__file__).with_name("producer_child.py")
PROMPTS = 8


def write_config(tmp_path: Path) -> Path:
    data = {
        "run": {"id": "kill-run", "out_dir": str(tmp_path), "topology": "disaggregated_online"},
        "target": {"builtin": TINY, "dtype": "float32", "batch_size": 1},
        "data": {"max_prompts": PROMPTS, "max_length": 48},
        "store": {"uri": f"shm://t{uuid.uuid4().hex[:12]}"},
        "ledger": {"uri": f"sqlite://{tmp_path}/ledger.sqlite"},
        "flow": {"high_watermark": 4, "low_watermark": 2},
        "trainer": {"batch_size": 2},
        "producer": {"workers": 1, "max_attempts": 3},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def consume_all(ledger, store, producer_thread) -> int:
    """Play a trainer: train every full window, release its features. Returns windows trained."""
    step = 0
    while True:
        window = ledger.assign_window(1, 2)
        if window is None:
            if not producer_thread.is_alive():
                return step
            time.sleep(0.02)
            continue
        ids = list(window.assignments[0])
        for ref in ledger.refs(ids):
            _, handle = store.get(ref)
            store.release(handle)
        ledger.ack(step, ids)
        step += 1


def test_sigkilled_producer_restarts_and_finishes_exactly_once(tmp_path):
    config = load_config(write_config(tmp_path))
    log = tmp_path / "child.log"
    with log.open("w") as sink:
        child = subprocess.Popen(
            [sys.executable, str(CHILD), str(tmp_path / "config.yaml")],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    store = None
    try:
        ledger = open_config_ledger(config)
        # With no trainer the child fills the high watermark (4) and blocks there.
        reached = wait_until(lambda: ledger.status().in_flight >= 4, timeout=90)
        assert reached, log.read_text()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        assert ledger.markers().producer.value == "running"  # a kill is not a clean end
        ledger.close()

        # Restart on the same ledger file, same producer id: it continues.
        engine = open_engine(config.target)
        ledger, store = open_config_ledger(config), open_config_store(config)
        prompts = load_prompts(config.data, engine.tokenizer)
        tasks = build_tasks(
            prompts.prompts,
            run_id=config.run.id,
            passes=1,
            max_length=48,
            target_version=engine.info.version,
        )
        producer = build_producer(config, engine, ledger, store)
        producer.open()
        assert len(producer.ingest(tasks).duplicates) == PROMPTS
        before = ledger.status().samples["committed"]
        outcome: list[str] = []
        thread = threading.Thread(target=lambda: outcome.append(producer.run().outcome))
        thread.start()
        windows = consume_all(ledger, store, thread)
        thread.join(timeout=30)
        assert outcome == ["closed"]
        status = ledger.status()
        assert status.samples["trained"] == PROMPTS and windows == PROMPTS // 2
        assert status.prompts["done"] == PROMPTS and status.prompts["failed"] == 0
        assert producer.workers[0].report().committed == PROMPTS - before
        # Exactly once: one sample per task id, none re-captured once committed.
        refs = ledger.refs([t.task_id for t in tasks])
        assert [r.sample_id for r in refs] == [t.task_id for t in tasks]
        assert store.health().resident_samples == 0  # consume-once: every feature freed
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if store is not None:
            store.gc()
            store.close()


def test_restarted_producer_features_match_a_fresh_capture(tmp_path):
    config = load_config(write_config(tmp_path), ["flow.high_watermark=64", "flow.low_watermark=2"])
    engine = open_engine(config.target)
    ledger, store = open_config_ledger(config), open_config_store(config)
    try:
        prompts = load_prompts(config.data, engine.tokenizer)
        tasks = build_tasks(prompts.prompts, run_id="kill-run", passes=1, max_length=48)
        first = build_producer(config, engine, ledger, store)
        first.open()
        first.ingest(tasks)
        first.stop()  # stopped before any work: the restart does it all
        assert first.run().outcome == "stopped"
        ledger.close()
        ledger = open_config_ledger(config)  # reopen the file, as a new process would
        second = build_producer(config, engine, ledger, store)
        second.open()
        assert second.run().outcome == "closed"
        for task, ref in zip(tasks, ledger.refs([t.task_id for t in tasks]), strict=True):
            tensors, handle = store.get(ref)
            expected = engine.capture([task])[0]
            for name in FEATURE_NAMES:
                assert torch.equal(tensors[name], expected.tensors[name]), name
            store.release(handle)
    finally:
        ledger.close()
        store.gc()
        store.close()


def test_producer_refuses_a_noop_ledger(tiny_engine):
    settings = ProducerSettings(run_id="r", quantum=1)
    producer = RolloutProducer(
        open_ledger("noop://"), open_store("memory://"), tiny_engine, settings
    )
    with pytest.raises(InvalidInputError, match="noop:// retains none; use memory://"):
        producer.open()


def test_a_different_quantum_on_the_same_ledger_is_refused(tmp_path, tiny_engine):
    uri = f"sqlite://{tmp_path}/l.sqlite"
    ledger = open_ledger(uri)
    RolloutProducer(ledger, open_store("memory://"), tiny_engine, ProducerSettings("r", 2)).open()
    other = RolloutProducer(ledger, open_store("memory://"), tiny_engine, ProducerSettings("r", 4))
    with pytest.raises(Exception, match="quantum") as info:
        other.open()
    assert ledger.markers().quantum == 2
    assert type(info.value).__name__ in ("LedgerConflictError", "InvalidInputError")
    ledger.close()


def test_several_workers_share_a_sqlite_ledger_and_shm_store(tmp_path):
    config = load_config(
        write_config(tmp_path),
        ["flow.high_watermark=64", "flow.low_watermark=2", "producer.workers=3"],
    )
    engine = open_engine(config.target)
    prompts = load_prompts(config.data, engine.tokenizer)
    tasks = build_tasks(prompts.prompts, run_id="kill-run", passes=2, max_length=48)
    ledger, store = open_config_ledger(config), open_config_store(config)
    try:
        producer = build_producer(config, engine, ledger, store)
        producer.open()
        producer.ingest(tasks)
        report = producer.run()
        assert report.outcome == "closed" and report.committed == 2 * PROMPTS
        assert sum(w.committed for w in report.workers) == 2 * PROMPTS
        status = ledger.status()
        assert status.samples["committed"] == 2 * PROMPTS and status.prompts["done"] == 2 * PROMPTS
        assert status.in_flight_bytes == sum(
            r.estimated_bytes for r in ledger.refs([t.task_id for t in tasks])
        )
        assert store.health().resident_samples == 2 * PROMPTS
    finally:
        for task in tasks:
            store.abort(task.task_id, "test over")
        ledger.close()
        store.gc()
        store.close()
