"""A torn or corrupt record is detected, never trained on.

Data plane: a truncated or garbled `shm://` segment, a torn (header cut short) or garbled
arena run, and a garbled `dir://` file raise CorruptRecordError / SchemaMismatchError at `get`
(and the record is not handed out); an arena run never published (its writer died) is not
found. Control
plane: a garbled ledger row is a CorruptRecordError when read; a file that is not a ledger is
refused at open, untouched. End to end (with the default arena, and with `arena_bytes=0`): a committed
sample whose run or segment is torn after the producer wrote it fails the real consumer with an
error naming it, and it never reaches `trained.jsonl`.
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
    SHM_PREFIX,
    SHM_ROOT,
    Job,
    cleanup_segments,
    consumer,
    expect_clean_exit,
    ledger_status,
    producer,
    shm_segments,
    trained_steps,
)

from dataflow.contracts import CorruptRecordError, NotFoundError, SampleRef, SchemaMismatchError
from dataflow.control import open_ledger
from dataflow.store import open_store
from dataflow.store.arena_format import GEOMETRY, RECORD, WRITING
from dataflow.store.usage import ArenaRun, shm_usage

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


def _run_of(store_name: str, sample_id: str) -> ArenaRun:
    (run,) = (r for r in shm_usage(store_name).runs if r.holds(sample_id))
    return run


def _arena_path(store_name: str) -> Path:
    return SHM_ROOT / f"{SHM_PREFIX}{store_name}~arena"


def _torn_run(store_name: str, sample_id: str) -> None:
    """The arena's torn sample: its run's bytes stop halfway through the header (zeros after)."""
    run = _run_of(store_name, sample_id)
    with _arena_path(store_name).open("r+b") as arena:
        arena.seek(run.offset)
        header_len = int.from_bytes(arena.read(8), "little")
        cut = 8 + header_len // 2
        arena.seek(run.offset + cut)
        arena.write(b"\0" * (run.nbytes - cut))


def _garbled_run(store_name: str, sample_id: str) -> None:
    run = _run_of(store_name, sample_id)
    with _arena_path(store_name).open("r+b") as arena:
        arena.seek(run.offset + 8)
        arena.write(b"\xff" * 32)  # inside the JSON header


def _unpublished_run(store_name: str, sample_id: str) -> None:
    """A half-written run: its head back in WRITING, as a writer that died before publishing."""
    run = _run_of(store_name, sample_id)
    table_at = GEOMETRY.unpack(_arena_path(store_name).read_bytes()[: GEOMETRY.size])[3]
    with _arena_path(store_name).open("r+b") as arena:
        arena.seek(table_at + run.start * RECORD.itemsize)
        arena.write(WRITING.to_bytes(4, "little"))


def _segment(damage):
    def on_segment(store_name: str, sample_id: str) -> None:
        (segment,) = shm_segments(store_name)
        damage(segment)

    return on_segment


@pytest.mark.parametrize(
    ("query", "damage", "refused"),
    [
        ("?arena_bytes=0", _segment(_torn), (CorruptRecordError, SchemaMismatchError)),
        ("?arena_bytes=0", _segment(_garbled), (CorruptRecordError, SchemaMismatchError)),
        ("?arena_bytes=1048576", _torn_run, (CorruptRecordError, SchemaMismatchError)),
        ("?arena_bytes=1048576", _garbled_run, (CorruptRecordError, SchemaMismatchError)),
        ("?arena_bytes=1048576", _unpublished_run, (NotFoundError,)),
    ],
    ids=["torn-segment", "garbled-segment", "torn-run", "garbled-run", "unpublished-run"],
)
def test_damaged_shm_sample_is_refused_at_get(query, damage, refused):
    name = f"gate-{uuid.uuid4().hex[:10]}"
    producer_store = open_store(f"shm://{name}{query}")
    consumer_store = open_store(f"shm://{name}")
    try:
        ref = producer_store.put("s-1", FEATURES, {})
        placed = shm_usage(name)
        assert (placed.segments, placed.arena_runs) == ((0, 1) if "=1" in query else (1, 0))
        damage(name, "s-1")
        with pytest.raises(refused) as info:
            consumer_store.get(ref)
        assert "s-1" in str(info.value), str(info.value)
        assert consumer_store.health().active_leases == 0  # nothing was handed out
    finally:
        consumer_store.abort("s-1", "test over")
        producer_store.close()
        consumer_store.close()
    cleanup_segments([name])  # an unpublished run is not freed by abort: gc's, once dead
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


@pytest.fixture(scope="module", params=["arena", "segment"])
def torn_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TornRun]:
    """A closed stream of 6 committed samples, one torn, then the real consumer.

    ``arena``: the default store (an arena of the run's byte budget), the victim's run torn;
    ``segment``: ``arena_bytes=0`` (one segment per sample), the victim's segment torn.
    """
    placement = request.param
    job = Job(
        tmp_path_factory.mktemp(f"torn-{placement}") / "run",
        6,  # < high watermark: closes alone
        store_query="" if placement == "arena" else "?arena_bytes=0",
    )
    try:
        expect_clean_exit(producer(job), 300)
        assert ledger_status(job.ledger).samples["committed"] == 6
        victim = f"{job.run_id}-p0-3"
        usage = shm_usage(job.store_name)
        if placement == "arena":
            assert (usage.segments, usage.arena_runs) == (0, 6), usage
            _torn_run(job.store_name, victim)
        else:
            assert (usage.segments, usage.arena_runs, usage.arena_file_bytes) == (6, 0, 0), usage
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
    placement = "arena run" if torn_run.job.store_query == "" else "segment"
    summary.append(
        f"faults/torn-{placement.replace(' ', '-')}: consumer exit {torn_run.code}, {len(trained)} samples trained "
        f"before it, the torn one ({torn_run.victim}) never"
    )


def test_torn_segment_error_names_the_corruption_and_marks_the_consumer_failed(torn_run):
    lines = [ln for ln in torn_run.output.splitlines() if "error:" in ln]
    assert lines and torn_run.victim in lines[-1], lines  # names the record that is torn
    status = ledger_status(torn_run.job.ledger)
    assert status.markers.consumer == "failed" and status.markers.consumer_reason
