"""shm:// with an arena: conformance, zero copy, the view rule, fallback, crashes, bad options."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conformance import StoreConformance, eagle_sample, same_bits
from procs import DEAD, expected_digest, run_child, start_child
from test_shm import SHM, leftovers, stored

from dataflow.contracts import CorruptRecordError, FeatureStore, InvalidInputError
from dataflow.contracts.codec import dumps
from dataflow.store import open_store
from dataflow.store.arena import PARALLEL_COPY_BYTES, geometry
from dataflow.store.owner import current_owner
from dataflow.store.shm import ARENA, PREFIX
from dataflow.store.usage import shm_usage

ARENA_BYTES = 8 << 20
_NAMES_USED: list[str] = []


@pytest.fixture
def name() -> Iterator[str]:
    """A fresh store name; asserts the test left nothing of it (arena included) in /dev/shm."""
    store_name = f"arenatest{uuid.uuid4().hex[:12]}"
    _NAMES_USED.append(store_name)
    yield store_name
    left = leftovers(store_name)
    for entry in left:  # clean up before failing, so one failure does not leak into others
        os.unlink(os.path.join(SHM, entry))
    assert left == [], f"left in /dev/shm: {left}"


@pytest.fixture(scope="module", autouse=True)
def nothing_left_in_dev_shm() -> Iterator[None]:
    """After the whole module, /dev/shm holds nothing of any store this module used."""
    yield
    left = [entry for used in _NAMES_USED for entry in leftovers(used)]
    assert left == [], f"left in /dev/shm: {left}"


def arena_file(name: str) -> str:
    return os.path.join(SHM, f"{PREFIX}{name}~{ARENA}")


def backing(ptr: int) -> list[int]:
    """The inode of the file mapped at ``ptr`` in this process (from /proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        return [
            int(line.split()[4])
            for line in maps
            if int(line.split("-")[0], 16) <= ptr < int(line.split()[0].split("-")[1], 16)
        ]


class TestShmArenaConformance(StoreConformance):
    """The whole suite with every sample in the arena (the budget, when set, still refuses)."""

    @pytest.fixture(autouse=True)
    def _name(self, name: str) -> None:
        self.name = name

    def open(self, tmp_path: Path, **options: Any) -> FeatureStore:
        return open_store(f"shm://{self.name}?arena_bytes={ARENA_BYTES}", **options)


def test_put_and_get_go_through_one_reused_arena_mapping(name: str) -> None:
    store = open_store(f"shm://{name}", arena_bytes=ARENA_BYTES)
    tensors = eagle_sample(0, tokens=2048, hidden=64)
    ref = store.put("zc", tensors)
    assert leftovers(name) == [f"{PREFIX}{name}~{ARENA}"]  # no segment: the sample is in it
    got, handle = store.get(ref)
    first = got["hidden_state"].data_ptr()
    assert backing(first) == [
        os.stat(arena_file(name)).st_ino
    ]  # the tensor's memory IS the arena, mapped
    got["hidden_state"].zero_()  # copy-on-write: the arena keeps the producer's bytes
    again, h2 = store.get(ref)  # already viewed here: a mapping of its own, never aliased
    assert again["hidden_state"].data_ptr() != first
    assert same_bits(again["hidden_state"], tensors["hidden_state"])
    store.release(handle)
    store.release(h2)
    del got, again
    other = eagle_sample(1, tokens=2048, hidden=64)
    ref2 = store.put("zc2", other)  # the freed run is reused: same address, new bytes
    got, handle = store.get(ref2)
    assert got["hidden_state"].data_ptr() - first in range(-4096, 4096)
    assert same_bits(got["hidden_state"], other["hidden_state"])  # the zeroed page was dropped
    store.release(handle)
    del got
    store.close()
    assert leftovers(name) == []


def test_small_and_large_tensors_are_copied_into_the_arena_bit_for_bit(name: str) -> None:
    # Below PARALLEL_COPY_BYTES a tensor is one memcpy in the caller's thread, at or above it
    # torch's copy: both, an empty tensor and odd offsets between them read back exactly.
    store = open_store(f"shm://{name}", arena_bytes=4 * PARALLEL_COPY_BYTES)
    large = PARALLEL_COPY_BYTES // 4 + 3  # float32 elements: just over the threshold
    tensors = {
        "a_small": torch.arange(7, dtype=torch.int64),
        "b_large": torch.randn(large, generator=torch.Generator().manual_seed(0)),
        "c_empty": torch.empty(0, 5, dtype=torch.bfloat16),
        "d_just_under": torch.randint(0, 255, (PARALLEL_COPY_BYTES - 1,), dtype=torch.uint8),
    }
    ref = store.put("sizes", tensors)
    assert leftovers(name) == [f"{PREFIX}{name}~{ARENA}"]  # in the arena, not a segment
    got, handle = store.get(ref)
    assert backing(got["b_large"].data_ptr()) == [os.stat(arena_file(name)).st_ino]
    for key, tensor in tensors.items():
        assert same_bits(got[key], tensor), key
    store.release(handle)
    del got
    store.close()


def test_a_tensor_still_referenced_after_release_is_never_overwritten(
    name: str,
) -> None:
    slab, nslabs = geometry(ARENA_BYTES)
    store = open_store(f"shm://{name}", arena_bytes=ARENA_BYTES)
    big = {"x": torch.full((ARENA_BYTES * 3 // 4,), 7, dtype=torch.uint8)}  # 3/4 of the arena
    ref = store.put("keep", big)
    got, handle = store.get(ref)
    store.release(handle)  # freed, but `got` still views the run
    ref2 = store.put("next", {"x": torch.full((ARENA_BYTES * 3 // 4,), 9, dtype=torch.uint8)})
    assert bool((got["x"] == 7).all())  # not overwritten: the put went elsewhere
    assert f"{PREFIX}{name}~next~{ref2.generation}" in leftovers(name)  # its own segment
    got2, h2 = store.get(ref2)
    assert bool((got2["x"] == 9).all())
    store.release(h2)
    del got, got2
    ref3 = store.put("third", big)  # the run is free again once nothing views it
    assert stored(name) == ["arena@0"]
    store.abort("third", "done")
    assert ref3.generation > ref2.generation
    store.close()
    assert nslabs * slab >= ARENA_BYTES and leftovers(name) == []


def test_without_pagemap_a_readers_writes_are_still_dropped_before_reuse(
    name: str,
) -> None:
    """Where /proc/self/pagemap cannot be read, the whole run is dropped from the reader's view."""
    store = open_store(f"shm://{name}", arena_bytes=ARENA_BYTES)
    ref = store.put("w", {"x": torch.full((1 << 20,), 1, dtype=torch.uint8)})
    got, handle = store.get(ref)
    arena = store._arena  # type: ignore[attr-defined]
    arena._pagemap = None  # as on a kernel that hides it
    got["x"][::4096] = 0  # copy-on-write pages in this process's view
    store.release(handle)
    del got
    ref2 = store.put("w2", {"x": torch.full((1 << 20,), 2, dtype=torch.uint8)})
    got, handle = store.get(ref2)  # same run, same view: must show the new bytes everywhere
    assert stored(name) == ["arena@0"] and bool((got["x"] == 2).all())
    store.release(handle)
    del got
    store.close()


def test_a_sample_larger_than_the_arena_falls_back_to_its_own_segment(
    name: str,
) -> None:
    store = open_store(f"shm://{name}?arena_bytes=65536")
    tensors = eagle_sample(2, tokens=4096, hidden=64)  # ~2.1 MiB > 64 KiB
    ref = store.put("huge", tensors)
    assert leftovers(name) == [f"{PREFIX}{name}~huge~{ref.generation}"]
    got, handle = store.get(ref)
    assert same_bits(got["aux_hidden_state"], tensors["aux_hidden_state"])
    store.release(handle)
    small = store.put("small", eagle_sample(3))  # a small one still goes to the arena
    assert leftovers(name) == [f"{PREFIX}{name}~{ARENA}"]
    store.abort("small", "done")
    store.close()
    assert leftovers(name) == [] and small.generation > ref.generation


def test_producer_process_puts_into_the_arena_consumer_process_reads_it(
    name: str,
) -> None:
    producer = start_child(
        """
        store = open_store(sys.argv[1])
        for line in sys.stdin:
            print(dumps(store.put(line.strip(), sample(int(line.strip()[1:])))), flush=True)
        assert store.health().resident_samples == 0, store.health()
        store.close()
        """,
        f"shm://{name}?arena_bytes={ARENA_BYTES}",
        stdin=True,
    )
    consumer = start_child(
        """
        import json
        store = open_store(sys.argv[1])
        for line in sys.stdin:
            tensors, handle = store.get(loads(line, SampleRef))
            seen = digest(tensors)
            store.release(handle)
            del tensors
            print(json.dumps(seen), flush=True)  # after the release: the producer may look
        store.close()
        """,
        f"shm://{name}",
        stdin=True,
    )
    assert producer.stdin and producer.stdout and consumer.stdin and consumer.stdout
    try:
        for i in range(5):
            producer.stdin.write(f"s{i}\n")
            producer.stdin.flush()
            ref_json = producer.stdout.readline()
            assert ".tmp" not in "".join(leftovers(name))
            assert leftovers(name) == [f"{PREFIX}{name}~{ARENA}"]
            consumer.stdin.write(ref_json)
            consumer.stdin.flush()
            assert json.loads(consumer.stdout.readline()) == expected_digest(i)
        producer.stdin.close()
        consumer.stdin.close()
        assert producer.wait(timeout=60) == 0, producer.stderr and producer.stderr.read()
        assert consumer.wait(timeout=60) == 0, consumer.stderr and consumer.stderr.read()
    finally:
        _reap(producer, consumer)
    assert leftovers(name) == []  # the last keeper closed with nothing in use: unlinked


def test_gc_reclaims_the_arena_runs_of_a_producer_killed_with_sigkill(
    name: str,
) -> None:
    producer = start_child(
        """
        store = open_store(sys.argv[1])
        for i in range(3):
            store.put(f"k{i}", sample(i))
        print("ready", flush=True)
        import time
        time.sleep(600)
        """,
        f"shm://{name}?arena_bytes={ARENA_BYTES}",
    )
    try:
        assert producer.stdout is not None
        assert producer.stdout.readline().strip() == "ready"
        assert len(stored(name)) == 3
        survivor = open_store(f"shm://{name}")
        assert survivor.gc().freed_samples == 0  # alive: nothing is reclaimed
        producer.send_signal(signal.SIGKILL)
        producer.wait(timeout=30)
    finally:
        _reap(producer)
    report = survivor.gc()
    assert report.freed_samples == 3 and report.freed_bytes >= 3 * 64 * 4
    assert leftovers(name) == []  # runs freed and, with no keeper left, the arena unlinked
    assert survivor.gc().freed_samples == 0


def test_a_sigkilled_consumer_leaves_no_pin(name: str) -> None:
    store = open_store(f"shm://{name}", arena_bytes=ARENA_BYTES, retain_on_release=True)
    big = {"x": torch.full((ARENA_BYTES * 3 // 4,), 5, dtype=torch.uint8)}
    ref = store.put("pinned", big)
    consumer = start_child(
        """
        store = open_store(sys.argv[1])
        tensors, handle = store.get(loads(sys.argv[2], SampleRef))
        print("holding", int(tensors["x"][0]), flush=True)
        import time
        time.sleep(600)
        """,
        f"shm://{name}",
        dumps(ref),
    )
    try:
        assert consumer.stdout is not None
        assert consumer.stdout.readline().split() == ["holding", "5"]
        store.abort("pinned", "free it while the consumer views it")
        again = store.put("again", big)
        assert f"{PREFIX}{name}~again~{again.generation}" in leftovers(name)  # run still pinned
        store.abort("again", "done")
        consumer.send_signal(signal.SIGKILL)
        consumer.wait(timeout=30)
    finally:
        _reap(consumer)
    store.put("after", big)  # the dead consumer's pin went with it: the run is reused
    assert stored(name) == ["arena@0"]
    store.abort("after", "done")
    store.close()
    assert leftovers(name) == []


def test_a_producer_exiting_without_close_leaves_no_empty_arena(name: str) -> None:
    out = run_child(
        """
        store = open_store(sys.argv[1])
        tensors, handle = store.get(store.put("e", sample(1)))
        store.release(handle)
        print(store.health().resident_samples)
        """,  # no close(): the interpreter exits normally
        f"shm://{name}?arena_bytes={ARENA_BYTES}",
    )
    assert out.strip() == "0"
    assert leftovers(name) == []


def test_gc_reclaims_an_arena_a_dead_process_was_creating(name: str) -> None:
    temp = f"{arena_file(name)}~{DEAD}.tmp"
    with open(temp, "wb") as f:
        f.write(b"\0" * 8192)
    alive = f"{arena_file(name)}~{current_owner()}.tmp"  # being created by a live process
    open(alive, "wb").close()
    try:
        report = open_store(f"shm://{name}").gc()
        assert (report.freed_samples, report.freed_bytes) == (0, 8192)
        assert leftovers(name) == [os.path.basename(alive)]
    finally:
        os.unlink(alive)


@pytest.mark.parametrize(
    ("uri_tail", "options", "message"),
    [
        ("?arena_bytes=lots", {}, "arena_bytes must be a whole number of bytes >= 0, got 'lots'"),
        ("?arena_bytes=-1", {}, "arena_bytes must be a whole number of bytes >= 0, got '-1'"),
        ("", {"arena_bytes": -5}, "arena_bytes must be an int >= 0, got -5"),
        ("", {"arena_bytes": True}, "arena_bytes must be an int >= 0, got True"),
        ("", {"arena_bytes": 1.5}, "arena_bytes must be an int >= 0, got 1.5"),
        ("?arena_bytes=4096", {"arena_bytes": 8192}, "4096 in the URI but 8192 as an option"),
        ("?arena=1", {}, r"unknown URI option\(s\) \['arena'\]"),
    ],
)
def test_bad_arena_options_are_refused_and_create_nothing(
    name: str,
    uri_tail: str,
    options: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        open_store(f"shm://{name}{uri_tail}", **options)
    assert leftovers(name) == []


def test_budget_still_refuses_and_without_arena_bytes_puts_make_segments(name: str) -> None:
    one = sum(t.numel() * t.element_size() for t in eagle_sample(0).values())
    store = open_store(f"shm://{name}", budget_bytes=one, arena_bytes=ARENA_BYTES)
    store.put("a", eagle_sample(0))
    with pytest.raises(Exception, match="budget"):
        store.put("b", eagle_sample(1))
    assert stored(name) == ["arena@0"]
    store.abort("a", "done")
    store.close()
    off = open_store(f"shm://{name}?arena_bytes=0", budget_bytes=1 << 20)  # explicitly off
    ref = off.put("c", eagle_sample(2))
    assert leftovers(name) == [f"{PREFIX}{name}~c~{ref.generation}"]
    off.abort("c", "done")
    off.close()
    assert leftovers(name) == []


def test_the_arena_defaults_to_the_byte_budget_and_is_off_without_one(name: str) -> None:
    budget = 4 << 20
    store = open_store(f"shm://{name}", budget_bytes=budget)
    ref = store.put("a", eagle_sample(0))
    assert stored(name) == ["arena@0"]
    slab, nslabs = geometry(budget)
    assert os.path.getsize(arena_file(name)) >= slab * nslabs  # sized from budget_bytes
    store.abort("a", "done")
    store.close()
    assert leftovers(name) == []
    plain = open_store(f"shm://{name}")  # no budget: no arena
    ref = plain.put("b", eagle_sample(1))
    assert leftovers(name) == [f"{PREFIX}{name}~b~{ref.generation}"]
    plain.abort("b", "done")
    plain.close()


def test_usage_counts_segments_and_arena_runs_from_outside(name: str) -> None:
    arena = open_store(f"shm://{name}", budget_bytes=4 << 20)
    segments = open_store(f"shm://{name}?arena_bytes=0", budget_bytes=4 << 20)
    assert shm_usage(name).empty
    a = arena.put("a", eagle_sample(0))
    arena.put("b", eagle_sample(1, tokens=64))
    s = segments.put("s", eagle_sample(0))
    usage = shm_usage(name)
    segment_size = os.path.getsize(os.path.join(SHM, f"{PREFIX}{name}~s~{s.generation}"))
    assert (usage.segments, usage.arena_runs, usage.samples) == (1, 2, 3)
    assert usage.segment_bytes == segment_size
    (run_a,) = [r for r in usage.runs if r.holds("a")]
    assert (run_a.state, run_a.generation, run_a.owner) == ("LIVE", a.generation, current_owner())
    assert run_a.nbytes == segment_size  # the same sample: the same layout bytes
    assert usage.bytes_in_use == segment_size + sum(r.nbytes for r in usage.runs)
    assert usage.bytes_in_use < usage.arena_file_bytes  # runs in use, not the file's size
    got, handle = segments.get(a)  # any store reads the arena
    want = eagle_sample(0)
    assert all(same_bits(got[k], want[k]) for k in want)
    segments.release(handle)
    del got
    for sample_id in ("a", "b", "s"):
        arena.abort(sample_id, "done")
    usage = shm_usage(name)
    assert (usage.samples, usage.bytes_in_use, usage.runs) == (0, 0, ())
    arena.close()
    segments.close()
    assert shm_usage(name).empty


def test_usage_refuses_a_file_that_is_not_an_arena(name: str) -> None:
    with open(arena_file(name), "wb") as bogus:
        bogus.write(b"x" * 4096)
    try:
        with pytest.raises(CorruptRecordError, match="not a dataflow arena"):
            shm_usage(name)
    finally:
        os.unlink(arena_file(name))


def _reap(*procs: subprocess.Popen[str]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream:
                stream.close()
