"""A torn or corrupt record is detected, never trained on.

Data plane: a truncated or garbled `shm://` segment and a garbled `dir://` file raise
CorruptRecordError / SchemaMismatchError at `get` (and the record is not handed out). Control
plane: a garbled ledger row is a CorruptRecordError when read; a file that is not a ledger is
refused at open, untouched. End to end: a committed sample whose segment is torn after the
producer wrote it fails the real consumer with an error naming it, and it never reaches
`trained.jsonl`.
"""

from __future__ import annotations

import gc
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from gate_runs import (
    Job,
    cleanup_segments,
    consumer,
    expect_clean_exit,
    ledger_status,
    producer,
    shm_segments,
    trained_steps,
)

from dataflow.contracts import CorruptRecordError, SampleRef, SchemaMismatchError
from dataflow.control import open_ledger
from dataflow.store import open_store

FEATURES = {
    "input_ids": torch.arange(16, dtype=torch.int64).reshape(1, 16),
    "hidden_state": torch.ones(1, 16, 8, dtype=torch.float32),
}


def _torn(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbled(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_torn, _garbled], ids=["torn", "garbled"])
def test_damaged_shm_segment_is_refused_at_get(damage):
    name = f"gate-{uuid.uuid4().hex[:10]}"
    producer_store, consumer_store = open_store(f"shm://{name}"), open_store(f"shm://{name}")
    try:
        ref = producer_store.put("s-1", FEATURES, {})
        (segment,) = shm_segments(name)
        damage(segment)
        with pytest.raises((CorruptRecordError, SchemaMismatchError)) as info:
            consumer_store.get(ref)
        assert "s-1" in str(info.value) or segment.name in str(info.value), str(info.value)
        assert consumer_store.health().active_leases == 0  # nothing was handed out
    finally:
        consumer_store.abort("s-1", "test over")
        producer_store.close()
        consumer_store.close()
    assert shm_segments(name) == []


def test_damaged_dir_file_is_refused_at_get(tmp_path):
    store = open_store(f"dir://{tmp_path / 'store'}")
    reader = open_store(f"dir://{tmp_path / 'store'}")
    try:
        ref = store.put("s-1", FEATURES, {})
        files = [p for p in (tmp_path / "store").rglob("*") if p.is_file() and "s-1" in str(p)]
        assert files, sorted(str(p) for p in (tmp_path / "store").rglob("*"))
        for path in files:
            _garbled(path)
        with pytest.raises((CorruptRecordError, SchemaMismatchError)):
            reader.get(ref)
        assert reader.health().active_leases == 0
    finally:
        store.close()
        reader.close()


def _ref(sample_id: str) -> SampleRef:
    ref = open_store("memory://").put(sample_id, FEATURES, {})
    return ref


def test_garbled_ledger_row_is_corrupt_record_not_data(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = open_ledger(f"sqlite://{path}")
    ledger.open_run("gate", 2, resume=False)
    ledger.commit([_ref("a-1"), _ref("a-2")])
    ledger.close()
    with sqlite3.connect(path) as db:
        db.execute(
            'UPDATE sample_refs SET ref = \'{"sample_id": 7, "garbage\' '
            "WHERE seq = (SELECT seq FROM samples WHERE id = 'a-2')"
        )
    ledger = open_ledger(f"sqlite://{path}")
    try:
        with pytest.raises(CorruptRecordError) as info:
            ledger.refs(["a-2"])
        message = str(info.value)
        assert "a-2" in message or "ref" in message, message
        assert [r.sample_id for r in ledger.refs(["a-1"])] == ["a-1"]  # the good row still reads
    finally:
        ledger.close()
    del info
    gc.collect()  # nothing of the failed read may outlive the closed ledger (no unraisable error)


def test_file_that_is_not_a_ledger_is_refused_untouched(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = open_ledger(f"sqlite://{path}")
    ledger.open_run("gate", 2, resume=False)
    ledger.close()
    data = bytearray(path.read_bytes())
    data[:16] = b"definitely-not-s"  # the SQLite magic header
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError):
        open_ledger(f"sqlite://{path}")
    assert path.read_bytes() == bytes(data)


@dataclass(frozen=True)
class TornRun:
    job: Job
    victim: str
    code: int
    output: str


@pytest.fixture(scope="module")
def torn_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TornRun]:
    """A closed stream of 6 committed samples, one segment torn, then the real consumer."""
    job = Job(tmp_path_factory.mktemp("torn") / "run", 6)  # < high watermark: closes alone
    try:
        expect_clean_exit(producer(job), 300)
        assert ledger_status(job.ledger).samples["committed"] == 6
        victim = f"{job.run_id}-p0-3"
        (segment,) = (p for p in shm_segments(job.store_name) if f"~{victim}~" in p.name)
        _torn(segment)
        role = consumer(job)
        code = role.wait(300)
        yield TornRun(job, victim, code, role.output())
    finally:
        cleanup_segments([job.store_name])  # the failed run's features: this test's to free


def test_torn_segment_in_a_run_fails_the_consumer_and_is_never_trained(torn_run, summary):
    assert torn_run.code == 2, f"consumer exited {torn_run.code}; log:\n{torn_run.output}"
    assert "Traceback" not in torn_run.output, torn_run.output
    trained = [sid for _, ids in trained_steps(torn_run.job.trained_log) for sid in ids]
    assert torn_run.victim not in trained
    status = ledger_status(torn_run.job.ledger)
    # Nothing is recorded as trained beyond what trained.jsonl lists; the victim is still known.
    assert status.samples["trained"] + status.samples["released"] == len(trained)
    ledger = open_ledger(torn_run.job.ledger)
    try:
        assert [r.sample_id for r in ledger.refs([torn_run.victim])] == [torn_run.victim]
    finally:
        ledger.close()
    summary.append(
        f"faults/torn-segment: consumer exit {torn_run.code}, {len(trained)} samples trained "
        f"before it, the torn one ({torn_run.victim}) never"
    )


def test_torn_segment_error_names_the_corruption_and_marks_the_consumer_failed(torn_run):
    lines = [ln for ln in torn_run.output.splitlines() if "error:" in ln]
    assert lines and torn_run.victim in lines[-1], lines  # names the record that is torn
    status = ledger_status(torn_run.job.ledger)
    assert status.markers.consumer == "failed" and status.markers.consumer_reason
