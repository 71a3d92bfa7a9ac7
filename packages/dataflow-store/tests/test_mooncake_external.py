"""mooncake:// adopting headerless objects a capture server wrote (SpecForge's server-capture
layout, written by ``dataflow_testing.spec_capture.SpecCaptureWriter``), on a real master.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from dataflow_testing.mooncake import MooncakeMaster
from dataflow_testing.spec_capture import SpecCaptureWriter

from dataflow.contracts import (
    CorruptRecordError,
    FeatureSpec,
    InvalidInputError,
    NotFoundError,
    SampleRef,
    SchemaMismatchError,
)
from dataflow.store import mooncake_wire as wire
from dataflow.store import open_store
from dataflow.store.mooncake_client import MooncakeClient
from dataflow.store.mooncake_settings import settings_from_uri

pytestmark = pytest.mark.mooncake


@pytest.fixture(scope="module")
def client(mooncake_master: MooncakeMaster) -> Iterator[MooncakeClient]:
    shared = MooncakeClient.connect(
        settings_from_uri(mooncake_master.uri, {"segment": "64MiB", "buffer": "16MiB"})
    )
    yield shared
    shared.close()


@pytest.fixture(scope="module")
def writer(mooncake_master: MooncakeMaster) -> Iterator[SpecCaptureWriter]:
    server = SpecCaptureWriter(mooncake_master.uri)
    yield server
    server.close()


def features(t: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(t)
    return {
        "input_ids": torch.arange(t, dtype=torch.int64).view(1, t),
        "hidden_state": torch.randn(1, t, 8, generator=g).to(torch.bfloat16),
    }


def specs_of(tensors: dict[str, torch.Tensor]) -> dict[str, FeatureSpec]:
    return {
        n: FeatureSpec(n, tuple(x.shape), str(x.dtype).removeprefix("torch."))
        for n, x in tensors.items()
    }


def server_writes(writer, store, sample_id, tensors) -> int:
    gen = store.new_generation(sample_id)
    spec = {"store_id": wire.PREFIX, "sample_id": sample_id, "gen": gen}
    writer.put_samples([(spec, tensors)])
    return gen


def test_a_server_written_sample_is_adopted_read_and_freed_without_a_put(
    mooncake_master, client, writer
):
    producer = open_store(mooncake_master.uri, client=client)
    tensors = features()
    gen = server_writes(writer, producer, "s-ok", tensors)
    assert writer.key(wire.PREFIX, "s-ok", gen, "hidden_state") == wire.feature_key(
        "s-ok", gen, "hidden_state"
    )
    ref = producer.adopt_external("s-ok", gen, specs_of(tensors), {"num_tokens": 5})
    assert ref.generation == gen and ref.metadata["mooncake_layout"] == "raw"
    assert ref.num_tokens == 5 and ref.estimated_bytes == 5 * 8 + 5 * 8 * 2
    consumer = open_store(mooncake_master.uri, client=client)  # another instance, as a trainer
    got, handle = consumer.get(ref)
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    consumer.release(handle)  # consume-once: the last lease frees the server's objects
    assert client.exists([wire.feature_key("s-ok", gen, "hidden_state")]) == [False]
    with pytest.raises(NotFoundError):
        consumer.get(ref)


def test_adoption_refuses_a_missing_object_naming_it(mooncake_master, client, writer):
    store = open_store(mooncake_master.uri, client=client)
    tensors = features()
    gen = server_writes(writer, store, "s-missing", {"input_ids": tensors["input_ids"]})
    with pytest.raises(NotFoundError, match=r"g\d+/hidden_state: no such object"):
        store.adopt_external("s-missing", gen, specs_of(tensors))
    assert store.health().resident_samples == 0  # nothing adopted
    assert client.exists([wire.manifest_key("s-missing", gen)]) == [False]
    store.abort("s-missing", "test")  # the producer's cleanup removes what the server wrote
    assert client.exists([wire.feature_key("s-missing", gen, "input_ids")]) == [False]


def test_adoption_refuses_a_size_that_is_not_numel_times_itemsize(mooncake_master, client, writer):
    store = open_store(mooncake_master.uri, client=client)
    tensors = features()
    gen = server_writes(writer, store, "s-size", tensors)
    wrong = specs_of(tensors)
    wrong["hidden_state"] = FeatureSpec("hidden_state", (1, 5, 8), "float32")  # bf16 written
    with pytest.raises(SchemaMismatchError, match=r"holds 80 bytes .* float32\[1, 5, 8\] = 40 x 4"):
        store.adopt_external("s-size", gen, wrong)
    assert store.health().resident_samples == 0
    store.abort("s-size", "test")


def test_a_ref_whose_spec_disagrees_with_the_stored_size_is_refused_on_get(
    mooncake_master, client, writer
):
    store = open_store(mooncake_master.uri, client=client)
    tensors = features()
    gen = server_writes(writer, store, "s-get", tensors)
    ref = store.adopt_external("s-get", gen, specs_of(tensors))
    forged = SampleRef(
        sample_id=ref.sample_id,
        store_uri=ref.store_uri,
        feature_keys=ref.feature_keys,
        feature_specs={
            **ref.feature_specs,
            "hidden_state": FeatureSpec("hidden_state", (1, 5, 4), "bfloat16"),
        },
        generation=ref.generation,
        metadata=ref.metadata,
    )
    with pytest.raises(SchemaMismatchError, match="headerless .* holds 80 bytes"):
        store.get(forged)
    unmarked = SampleRef(
        sample_id=ref.sample_id,
        store_uri=ref.store_uri,
        feature_keys=ref.feature_keys,
        feature_specs=ref.feature_specs,
        generation=ref.generation,
    )
    with pytest.raises((CorruptRecordError, SchemaMismatchError)):  # never reinterpreted
        store.get(unmarked)
    bad_marker = SampleRef(
        sample_id=ref.sample_id,
        store_uri=ref.store_uri,
        feature_keys=ref.feature_keys,
        feature_specs=ref.feature_specs,
        generation=ref.generation,
        metadata={"mooncake_layout": "zstd"},
    )
    with pytest.raises(InvalidInputError, match="mooncake_layout"):
        store.get(bad_marker)
    got, handle = store.get(ref)  # the genuine ref still reads
    assert torch.equal(got["hidden_state"], tensors["hidden_state"])
    store.release(handle)


def test_adopting_twice_or_a_bad_generation_is_refused(mooncake_master, client, writer):
    store = open_store(mooncake_master.uri, client=client)
    tensors = features()
    gen = server_writes(writer, store, "s-twice", tensors)
    store.adopt_external("s-twice", gen, specs_of(tensors))
    with pytest.raises(CorruptRecordError, match="already adopted"):
        store.adopt_external("s-twice", gen, specs_of(tensors))
    with pytest.raises(InvalidInputError, match="generation must be an int >= 1"):
        store.adopt_external("s-twice", 0, specs_of(tensors))
    with pytest.raises(InvalidInputError, match="non-empty mapping"):
        store.adopt_external("s-twice", gen + 1, {})
    store.abort("s-twice", "test")
    assert client.exists([wire.feature_key("s-twice", gen, "input_ids")]) == [False]
