"""shm:// passes the conformance suite; zero copy, cross-process, SIGKILL reclaim, no leftovers."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conformance import StoreConformance, eagle_sample, same_bits
from procs import DEAD, FULL_DISK_PUT, expected_digest, run_child, start_child

from dataflow.contracts import (
    CapacityExceededError,
    FeatureStore,
    InvalidInputError,
    NotFoundError,
    SampleRef,
    StaleGenerationError,
)
from dataflow.contracts.codec import dumps, loads
from dataflow.store import open_store
from dataflow.store.arena import Arena
from dataflow.store.shm import ARENA, PREFIX

SHM = "/dev/shm"


def leftovers(name: str) -> list[str]:
    return sorted(e for e in os.listdir(SHM) if e.startswith(f"{PREFIX}{name}~"))


def stored(name: str) -> list[str]:
    """What holds samples now: segments, plus the arena's runs in use (``arena@<slab>``).

    The arena file itself may exist while a store that puts into it is open.
    """
    out = [e for e in leftovers(name) if e != f"{PREFIX}{name}~{ARENA}"]
    arena = Arena.open(os.path.join(SHM, f"{PREFIX}{name}~{ARENA}"))
    if arena is not None:
        try:
            out += [f"arena@{start}" for start, *_ in arena.heads()]
        finally:
            arena.close()
    return sorted(out)


_NAMES_USED: list[str] = []


@pytest.fixture
def name() -> Iterator[str]:
    """A fresh store name; asserts the test left nothing of it in /dev/shm."""
    store_name = f"storetest{uuid.uuid4().hex[:12]}"
    _NAMES_USED.append(store_name)
    yield store_name
    left = leftovers(store_name)
    for entry in left:  # clean up before failing, so one failure does not leak into others
        os.unlink(os.path.join(SHM, entry))
    assert left == [], f"segments left in /dev/shm: {left}"


@pytest.fixture(scope="module", autouse=True)
def nothing_left_in_dev_shm() -> Iterator[None]:
    """After the whole module, /dev/shm holds no segment of any store this module used.

    Only this run's names are checked: another run of the suite may be using /dev/shm now.
    """
    yield
    left = [entry for used in _NAMES_USED for entry in leftovers(used)]
    assert left == [], f"segments left in /dev/shm: {left}"


class TestShmConformance(StoreConformance):
    @pytest.fixture(autouse=True)
    def _name(self, name: str) -> None:
        self.name = name

    def open(self, tmp_path: Path, **options: Any) -> FeatureStore:
        options.setdefault("arena_bytes", 0)  # one segment per sample (the arena's own suite)
        return open_store(f"shm://{self.name}", **options)


def test_get_maps_the_producers_segment_without_copying(name: str) -> None:
    store = open_store(f"shm://{name}")
    tensors = eagle_sample(0, tokens=2048, hidden=64)
    ref = store.put("zc", tensors)
    got, handle = store.get(ref)
    segment = os.path.join(SHM, leftovers(name)[0])
    ptr = got["hidden_state"].data_ptr()
    with open("/proc/self/maps") as maps:
        backing = [
            line.split()[-1]
            for line in maps
            if int(line.split("-")[0], 16) <= ptr < int(line.split()[0].split("-")[1], 16)
        ]
    assert backing == [segment]  # the tensor's memory IS the segment, mapped
    got["hidden_state"].zero_()  # copy-on-write: the segment keeps the producer's bytes
    again, h2 = store.get(ref)
    assert same_bits(again["hidden_state"], tensors["hidden_state"])
    store.release(handle)
    store.release(h2)
    assert leftovers(name) == []
    assert same_bits(
        again["aux_hidden_state"], tensors["aux_hidden_state"]
    )  # mapping outlives unlink


def test_producer_process_puts_consumer_process_gets_by_ref_alone(name: str) -> None:
    ref_json = run_child(
        """
        store = open_store(sys.argv[1])
        ref = store.put("xp", sample(7), {"num_tokens": 64})
        store.close()  # a clean exit detaches: the segment outlives the producer
        print(dumps(ref))
        """,
        f"shm://{name}",
    )
    ref = loads(ref_json, SampleRef)
    assert ref.num_tokens == 64 and len(leftovers(name)) == 1
    assert open_store(f"shm://{name}").gc().freed_samples == 0  # detached, not orphaned
    assert len(leftovers(name)) == 1
    out = _consume(name, ref_json)
    assert json.loads(out) == expected_digest(7)
    assert leftovers(name) == []  # the consumer's release unlinked it


def _consume(name: str, ref_json: str) -> str:
    return run_child(
        """
        import json
        store = open_store(sys.argv[1])
        ref = loads(sys.argv[2], SampleRef)
        tensors, handle = store.get(ref)
        print(json.dumps(digest(tensors)))
        store.release(handle)
        assert store.health().resident_samples == 0
        """,
        f"shm://{name}",
        ref_json,
    )


def test_stale_ref_is_refused_across_processes(name: str) -> None:
    store = open_store(f"shm://{name}")
    old = store.put("st", eagle_sample(1))
    new = store.put("st", eagle_sample(2))
    out = run_child(
        """
        from dataflow.contracts import StaleGenerationError
        store = open_store(sys.argv[1])
        try:
            store.get(loads(sys.argv[2], SampleRef))
        except StaleGenerationError as exc:
            print(exc)
        """,
        f"shm://{name}",
        dumps(old),
    )
    assert f"generation {old.generation} is stale; generation {new.generation} replaced it" in out
    store.abort("st", "done")
    with pytest.raises(NotFoundError):
        store.get(new)


def test_abort_from_another_process_frees_and_producer_health_follows(name: str) -> None:
    store = open_store(f"shm://{name}", budget_bytes=10 * 1024 * 1024)
    ref = store.put("ab", eagle_sample(3))
    assert store.health().resident_samples == 1
    run_child("open_store(sys.argv[1]).abort('ab', 'dropped')", f"shm://{name}")
    assert stored(name) == []
    assert store.health().resident_samples == 0
    with pytest.raises(NotFoundError, match="released or aborted"):
        store.get(ref)
    store.close()
    assert leftovers(name) == []


def test_a_put_over_budget_finds_the_room_another_process_freed(name: str) -> None:
    one = sum(t.numel() * t.element_size() for t in eagle_sample(0).values())
    store = open_store(f"shm://{name}", budget_bytes=2 * one)
    store.put("f1", eagle_sample(1))
    store.put("f2", eagle_sample(2))
    with pytest.raises(CapacityExceededError, match="budget"):
        store.put("f3", eagle_sample(3))
    run_child("open_store(sys.argv[1]).abort('f1', 'consumed')", f"shm://{name}")
    ref = store.put("f3", eagle_sample(3))  # no health() first: the put itself re-reads
    with pytest.raises(CapacityExceededError, match="budget"):  # f2 + f3: full again
        store.put("f4", eagle_sample(4))
    got, handle = store.get(ref)
    assert same_bits(got["hidden_state"], eagle_sample(3)["hidden_state"])
    store.release(handle)  # consume-once: frees f3
    del got
    store.abort("f2", "done")
    store.close()
    assert leftovers(name) == []


def test_gc_reclaims_segments_of_a_producer_killed_with_sigkill(name: str) -> None:
    producer = start_child(
        """
        store = open_store(sys.argv[1])
        for i in range(3):
            store.put(f"k{i}", sample(i))
        print("ready", flush=True)
        import time
        time.sleep(600)
        """,
        f"shm://{name}",
    )
    try:
        assert producer.stdout is not None
        assert producer.stdout.readline().strip() == "ready"
        assert len(leftovers(name)) == 3
        survivor = open_store(f"shm://{name}")
        assert survivor.gc().freed_samples == 0  # the producer is alive: nothing is reclaimed
        assert len(leftovers(name)) == 3
        producer.send_signal(signal.SIGKILL)
        producer.wait(timeout=30)
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait()
        if producer.stdout:
            producer.stdout.close()
        if producer.stderr:
            producer.stderr.close()
    report = survivor.gc()
    assert report.freed_samples == 3 and report.freed_bytes > 3 * 64 * 4
    assert leftovers(name) == []
    assert survivor.gc().freed_samples == 0


def test_gc_reclaims_a_half_written_temporary_of_a_dead_producer(name: str) -> None:
    dead = DEAD
    temp = os.path.join(SHM, f"{PREFIX}{name}~half~5~{dead}.tmp")
    with open(temp, "wb") as f:
        f.write(b"\0" * 4096)
    store = open_store(f"shm://{name}")
    report = store.gc()
    assert (report.freed_samples, report.freed_bytes) == (0, 4096)
    assert leftovers(name) == []


def test_leased_segment_of_a_dead_producer_is_spared_until_released(name: str) -> None:
    ref_json = run_child(
        """
        store = open_store(sys.argv[1])
        print(dumps(store.put("ls", sample(4))))
        import os
        os._exit(0)  # exit without close: the owner is gone, the segment is an orphan
        """,
        f"shm://{name}",
    )
    store = open_store(f"shm://{name}")
    tensors, handle = store.get(loads(ref_json, SampleRef))
    assert store.gc().freed_samples == 0  # leased here
    store.release(handle)
    assert leftovers(name) == []
    assert tensors["input_ids"].shape == (64,)


def test_bad_names_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="limit is 40"):
        open_store("shm://" + "n" * 41)
    with pytest.raises(InvalidInputError, match="forbidden character"):
        open_store("shm://bad~name")
    with pytest.raises(InvalidInputError, match="is not a directory"):
        open_store("shm://x", root="/nonexistent-dir")


def test_planted_symlink_is_not_followed(name: str, tmp_path: Path) -> None:
    store = open_store(f"shm://{name}")
    ref = store.put("sym", eagle_sample(5))
    segment = os.path.join(SHM, leftovers(name)[0])
    os.unlink(segment)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"x" * 100)
    os.symlink(target, segment)
    try:
        with pytest.raises(Exception, match="symlink; refusing to follow it"):
            store.get(ref)
        assert store.health().active_leases == 0
    finally:
        os.unlink(segment)
    store.abort("sym", "done")
    assert target.read_bytes() == b"x" * 100


def test_gc_retries_a_free_that_really_failed(name: str) -> None:
    """A real OS failure (no fault hook): the segment's name is taken by a non-empty directory."""
    store = open_store(f"shm://{name}")
    ref = store.put("f", eagle_sample(0))
    _, handle = store.get(ref)
    segment = os.path.join(SHM, leftovers(name)[0])
    os.unlink(segment)
    os.mkdir(segment)
    blocker = os.path.join(segment, "blocker")
    open(blocker, "w").close()
    try:
        store.release(handle)  # unlink fails (EISDIR): parked, still counted
        assert store.health().pending_frees == 1
        report = store.gc()
        assert (report.retried_frees, report.failed_frees) == (1, 1)
    finally:
        os.unlink(blocker)
        os.rmdir(segment)
    report = store.gc()
    assert (report.retried_frees, report.failed_frees, report.freed_samples) == (1, 0, 1)
    assert store.health().pending_frees == 0


def test_a_write_the_filesystem_refuses_is_a_capacity_error_and_leaves_nothing(name: str) -> None:
    out = run_child(FULL_DISK_PUT, f"shm://{name}")
    assert "refused:" in out and "no room for" in out and "File too large" in out
    assert leftovers(name) == []


def test_a_put_retires_older_generations_another_producer_left(name: str) -> None:
    other = open_store(f"shm://{name}")
    old = other.put("g", eagle_sample(1))
    mine = open_store(f"shm://{name}")
    new = mine.put("g", eagle_sample(2))
    assert new.generation > old.generation
    assert len(leftovers(name)) == 1  # only the new generation's segment remains
    third = open_store(f"shm://{name}")
    with pytest.raises(StaleGenerationError, match="replaced it"):
        third.get(old)
    mine.abort("g", "done")
    assert leftovers(name) == []
