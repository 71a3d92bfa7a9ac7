"""Foreign writers (dataflow.store.staging) on every shared backend: reserve, stage, adopt.

One producer instance reserves and adopts, a second instance (another process's view of the
same store: for mooncake:// a second client with its own segment) stages, a third reads as a
consumer. Each case checks what the producer sees and that nothing is left afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conformance import eagle_sample, same_bits
from procs import DEAD

from dataflow.contracts import (
    CapacityExceededError,
    CorruptRecordError,
    FeatureSpec,
    InvalidInputError,
    NotFoundError,
    SchemaMismatchError,
    StaleGenerationError,
)
from dataflow.store import open_store
from dataflow.store.staging import steward

Opener = Callable[..., Any]


def specs_of(tensors: dict[str, torch.Tensor]) -> dict[str, FeatureSpec]:
    return {
        n: FeatureSpec(n, tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for n, t in tensors.items()
    }


def _shm_left(name: str) -> Callable[[], list[str]]:
    """Files of ``shm://name`` but its arena (kept while instances are open) + its arena runs."""
    from dataflow.store.usage import shm_usage

    def left() -> list[str]:
        files = [
            e
            for e in os.listdir("/dev/shm")
            if e.startswith(f"dfs~{name}~") and e != f"dfs~{name}~arena"
        ]
        return sorted(files + [f"arena run {r.state}" for r in shm_usage(name).runs])

    return left


def _shm_opener(tmp_path: Path) -> tuple[Opener, Callable[[], list[str]]]:
    name = f"stg{uuid.uuid4().hex[:8]}"
    return (lambda **o: open_store(f"shm://{name}", **o)), _shm_left(name)


def _dir_opener(tmp_path: Path) -> tuple[Opener, Callable[[], list[str]]]:
    root = tmp_path / "features"

    def left() -> list[str]:
        return sorted(
            e for e in os.listdir(root) if e not in (".dataflow-store.json", ".generation")
        )

    return (lambda **o: open_store(f"dir://{root}", fsync=False, **o)), left


def _shm_arena_opener(tmp_path: Path) -> tuple[Opener, Callable[[], list[str]]]:
    """shm:// with an arena (the producer's options); files and arena runs left over."""
    name = f"sta{uuid.uuid4().hex[:8]}"
    left = _shm_left(name)
    return (lambda **o: open_store(f"shm://{name}", **{"arena_bytes": 16 << 20, **o})), left


@pytest.fixture(
    params=["shm", "shm-arena", "dir", pytest.param("mooncake", marks=pytest.mark.mooncake)]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Opener, Any]]:
    """(scheme, opener of instances, leftovers) for one backend; every instance closed after."""
    made: list[Any] = []
    if request.param == "mooncake":
        from dataflow.store.mooncake_client import MooncakeClient
        from dataflow.store.mooncake_settings import settings_from_uri

        master = request.getfixturevalue("mooncake_master")
        clients = [
            MooncakeClient.connect(
                settings_from_uri(master.uri, {"segment": "64MiB", "buffer": "16MiB"})
            )
            for _ in range(2)
        ]
        count = iter(range(1 << 30))

        def opener(**o: Any) -> Any:
            return open_store(master.uri, client=clients[min(next(count), 1)], **o)

        def left() -> list[str]:
            return []  # checked per case through the producer's health and exists()

    else:
        openers = {"shm": _shm_opener, "shm-arena": _shm_arena_opener, "dir": _dir_opener}
        opener, left = openers[request.param](tmp_path)
        clients = []

    def tracked(**o: Any) -> Any:
        store = opener(**o)
        made.append(store)
        return store

    yield request.param, tracked, left
    for store in made:
        store.close()
    for client in clients:
        client.close()


def test_a_staged_sample_is_adopted_read_by_a_consumer_and_freed(backend) -> None:
    _, open_, left = backend
    producer, writer = open_(), open_()
    tensors = eagle_sample(1, tokens=12, hidden=16)
    gen = producer.reserve("s1")
    specs = writer.stage("s1", gen, tensors, steward=steward())
    assert specs == specs_of(tensors)
    ids = producer.staged_tensors("s1", gen, {"input_ids": specs["input_ids"]})
    assert torch.equal(ids["input_ids"], tensors["input_ids"])
    assert producer.health().resident_samples == 0  # staged is not stored
    ref = producer.adopt("s1", gen, specs, {"num_tokens": 12})
    assert ref.generation == gen and ref.num_tokens == 12
    assert ref.estimated_bytes == sum(s.nbytes for s in specs.values())
    assert producer.health().resident_samples == 1
    consumer = open_()
    got, handle = consumer.get(ref)
    for name, tensor in tensors.items():
        assert same_bits(got[name], tensor), name
    consumer.release(handle)  # consume-once: the consumer frees what the writer wrote
    del got
    with pytest.raises(NotFoundError):
        consumer.get(ref)
    producer.gc()
    assert producer.health().resident_samples == 0
    assert left() == []


def test_refused_adoptions_name_the_problem_and_change_nothing(backend) -> None:
    _, open_, left = backend
    producer, writer = open_(), open_()
    tensors = eagle_sample(2, tokens=8, hidden=16)
    gen = producer.reserve("s2")
    specs = writer.stage("s2", gen, tensors, steward=steward())
    wrong_shape = {**specs, "hidden_state": FeatureSpec("hidden_state", (1, 9, 16), "bfloat16")}
    wrong_dtype = {**specs, "hidden_state": FeatureSpec("hidden_state", (1, 8, 16), "float32")}
    with pytest.raises(NotFoundError, match="s2"):
        producer.adopt("s2", gen + 1, specs)  # wrong generation
    with pytest.raises(NotFoundError, match="nobody"):
        producer.adopt("nobody", gen, specs)  # unknown sample
    with pytest.raises(SchemaMismatchError, match="hidden_state"):
        producer.adopt("s2", gen, wrong_shape)
    with pytest.raises(SchemaMismatchError, match="hidden_state"):
        producer.adopt("s2", gen, wrong_dtype)
    for bad in (0, -1, True, "1", 1.0):
        with pytest.raises(InvalidInputError, match="generation"):
            producer.adopt("s2", bad, specs)
    with pytest.raises(InvalidInputError, match="specs"):
        producer.adopt("s2", gen, {})
    with pytest.raises(InvalidInputError, match="steward"):
        writer.stage("s3", producer.reserve("s3"), tensors, steward="nobody")
    with pytest.raises(InvalidInputError, match="sample id"):
        producer.reserve("../escape")
    assert producer.health().resident_samples == 0
    ref = producer.adopt("s2", gen, specs)  # the staged sample is intact after every refusal
    got, handle = producer.get(ref)
    assert same_bits(got["aux_hidden_state"], tensors["aux_hidden_state"])
    producer.release(handle)
    del got
    producer.gc()
    assert left() == []


def test_a_stale_staged_generation_is_refused(backend) -> None:
    _, open_, left = backend
    producer, writer = open_(), open_()
    tensors = eagle_sample(3, tokens=4, hidden=8)
    old = producer.reserve("s4")
    specs = writer.stage("s4", old, tensors, steward=steward())
    newer = producer.put("s4", tensors)  # a later attempt stored a newer generation
    assert newer.generation > old
    with pytest.raises(StaleGenerationError, match="stale"):
        producer.adopt("s4", old, specs)
    producer.abort("s4", "test done")  # removes the stored one and the staged one
    assert left() == []
    with pytest.raises(NotFoundError):
        producer.adopt("s4", old, specs)


def test_budget_holds_and_abort_removes_an_unadopted_sample(backend) -> None:
    _, open_, left = backend
    tensors = eagle_sample(4, tokens=16, hidden=16)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    producer, writer = open_(budget_bytes=nbytes - 1), open_()
    gen = producer.reserve("s5")
    specs = writer.stage("s5", gen, tensors, steward=steward())
    with pytest.raises(CapacityExceededError, match="budget"):
        producer.adopt("s5", gen, specs)
    assert producer.health().resident_bytes == 0
    producer.abort("s5", "over budget")
    with pytest.raises(NotFoundError):
        producer.staged_tensors("s5", gen, {"input_ids": specs["input_ids"]})
    assert left() == []


@pytest.mark.parametrize("scheme", ["shm", "shm-arena", "dir"])
def test_a_sample_staged_for_a_dead_steward_is_reclaimed_by_gc(scheme, tmp_path) -> None:
    openers = {"shm": _shm_opener, "shm-arena": _shm_arena_opener, "dir": _dir_opener}
    opener, left = openers[scheme](tmp_path)
    writer, bystander = opener(), opener()
    host = steward().split("@")[0]
    gen = bystander.reserve("s6")
    writer.stage("s6", gen, eagle_sample(5, tokens=4, hidden=8), steward=f"{host}@{DEAD}")
    alive = bystander.reserve("s7")
    writer.stage("s7", alive, eagle_sample(6, tokens=4, hidden=8), steward=steward())
    assert len(left()) == 2
    report = bystander.gc()  # any process's gc: the dead steward's staged sample goes
    assert report.freed_bytes > 0
    assert len(left()) == 1  # the live steward's stays, for it to adopt
    bystander.abort("s7", "test done")
    assert left() == []
    writer.close()
    bystander.close()


def test_a_store_other_processes_cannot_write_refuses_staging() -> None:
    store = open_store("memory://staging")
    with pytest.raises(InvalidInputError, match="memory:// store cannot take features"):
        store.reserve("s")
    with pytest.raises(InvalidInputError, match="memory:// store cannot take features"):
        store.stage("s", 1, {"x": torch.zeros(1)}, steward=steward())
    with pytest.raises(InvalidInputError, match="memory:// store cannot take features"):
        store.adopt("s", 1, {"x": FeatureSpec("x", (1,), "float32")})
    store.close()


def test_unstage_removes_only_that_staged_generation(backend) -> None:
    _, open_, left = backend
    producer, writer = open_(), open_()
    tensors = eagle_sample(7, tokens=4, hidden=8)
    stored = producer.put("s8", tensors)
    refused = producer.reserve("s8")
    specs = writer.stage("s8", refused, tensors, steward=steward())
    producer.unstage("s8", refused)  # e.g. the producer refused its token ids
    producer.unstage("s8", refused)  # idempotent
    with pytest.raises(NotFoundError):
        producer.adopt("s8", refused, specs)
    got, handle = producer.get(stored)  # the stored generation is untouched
    assert same_bits(got["input_ids"], tensors["input_ids"])
    producer.release(handle)
    del got
    producer.gc()
    assert left() == []


def test_a_sample_written_in_place_is_adopted_like_a_staged_one(backend) -> None:
    _, open_, left = backend
    producer, writer = open_(), open_()
    tensors = eagle_sample(3, tokens=10, hidden=16)
    specs = specs_of(tensors)
    gen = producer.reserve("w1")
    with writer.stage_writer("w1", gen, specs, steward=steward()) as staged:
        assert {n: specs_of({n: t})[n] for n, t in staged.tensors.items()} == specs
        with pytest.raises(NotFoundError):  # nothing is staged before publish
            producer.staged_tensors("w1", gen, {"input_ids": specs["input_ids"]})
        for name, tensor in tensors.items():
            staged.tensors[name].copy_(tensor)
    ref = producer.adopt("w1", gen, specs, {"num_tokens": 10})
    consumer = open_()
    got, handle = consumer.get(ref)
    for name, tensor in tensors.items():
        assert same_bits(got[name], tensor), name
    consumer.release(handle)
    del got, staged
    producer.gc()
    assert left() == []


def test_a_failed_or_discarded_in_place_write_stages_nothing(backend) -> None:
    _, open_, left = backend
    producer, writer = open_(), open_()
    tensors = eagle_sample(4, tokens=6, hidden=8)
    specs = specs_of(tensors)
    gen = producer.reserve("w2")
    with pytest.raises(RuntimeError), writer.stage_writer("w2", gen, specs, steward=steward()):
        raise RuntimeError("the capture failed half-way")
    with pytest.raises(NotFoundError):
        producer.adopt("w2", gen, specs)
    staged = writer.stage_writer("w2", gen, specs, steward=steward())
    staged.discard()
    staged.discard()  # idempotent
    with pytest.raises(InvalidInputError):
        staged.publish()
    with pytest.raises(NotFoundError):
        producer.adopt("w2", gen, specs)
    with pytest.raises(InvalidInputError):  # refused before anything is written
        writer.stage_writer("w2", gen, specs, steward="nobody")
    with pytest.raises(InvalidInputError):
        writer.stage_writer("w2", 0, specs, steward=steward())
    del staged
    producer.gc()
    assert left() == []


def test_an_in_place_write_never_overwrites_a_staged_generation(backend) -> None:
    _, open_, _ = backend
    producer, writer = open_(), open_()
    tensors = eagle_sample(5, tokens=4, hidden=8)
    specs = specs_of(tensors)
    gen = producer.reserve("w3")
    writer.stage("w3", gen, tensors, steward=steward())
    with pytest.raises(CorruptRecordError):  # refused when opened (arena) or at publish
        staged = writer.stage_writer("w3", gen, specs, steward=steward())
        staged.tensors["input_ids"].fill_(7)
        staged.publish()
    got = producer.staged_tensors("w3", gen, {"input_ids": specs["input_ids"]})
    assert torch.equal(got["input_ids"], tensors["input_ids"])
    producer.abort("w3", "test done")


def test_with_an_arena_a_staged_sample_takes_an_arena_run_not_a_segment(tmp_path) -> None:
    from dataflow.store.usage import shm_usage

    opener, left = _shm_arena_opener(tmp_path)
    producer = opener()
    writer = open_store(producer.uri)  # a foreign writer opens by URI, without options
    tensors = eagle_sample(8, tokens=16, hidden=32)
    specs = specs_of(tensors)
    gen = producer.reserve("a1")
    with writer.stage_writer("a1", gen, specs, steward=steward()) as staged:
        for name, tensor in tensors.items():
            staged.tensors[name].copy_(tensor)
    name = producer.uri.removeprefix("shm://")
    usage = shm_usage(name)
    assert [r.state for r in usage.runs] == ["STAGED"] and usage.segments == 0
    assert usage.samples == 0  # staged is not in flight until adopted
    assert left() == ["arena run STAGED"]
    ids = producer.staged_tensors("a1", gen, {"input_ids": specs["input_ids"]})
    assert torch.equal(ids["input_ids"], tensors["input_ids"])
    with pytest.raises(NotFoundError):  # get never reads a staged run
        producer.adopt("a1", gen + 1, specs)
    ref = producer.adopt("a1", gen, specs)
    assert [r.state for r in shm_usage(name).runs] == ["LIVE"]
    with pytest.raises(NotFoundError):
        producer.adopt("a1", gen, specs)  # not twice: nothing is staged any more
    consumer = opener()
    got, handle = consumer.get(ref)
    for feature, tensor in tensors.items():
        assert same_bits(got[feature], tensor), feature
    consumer.release(handle)
    del got, staged
    producer.gc()
    assert left() == []
    for store in (writer, consumer, producer):
        store.close()
    assert not os.path.exists(f"/dev/shm/dfs~{name}~arena")
