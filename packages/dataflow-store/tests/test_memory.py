"""memory:// passes the conformance suite; its own guarantees: zero-copy get, in-process only."""

from pathlib import Path
from typing import Any

import pytest
import torch
from conformance import StoreConformance, eagle_sample

from dataflow.contracts import FeatureStore, InvalidInputError, NotFoundError, SampleRef
from dataflow.store import open_store


class TestMemoryConformance(StoreConformance):
    def open(self, tmp_path: Path, **options: Any) -> FeatureStore:
        return open_store("memory://conformance", **options)


def test_get_hands_out_the_stored_tensors_without_copying():
    store = open_store("memory://zc")
    tensors = eagle_sample(0)
    ref = store.put("s", tensors)
    got, handle = store.get(ref)
    assert got["hidden_state"].data_ptr() == tensors["hidden_state"].data_ptr()
    store.release(handle)
    assert store.health().resident_samples == 0


def test_non_contiguous_and_non_cpu_inputs_are_staged_as_contiguous_cpu():
    store = open_store("memory://staging")
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    ref = store.put("t", {"x": base.t()})
    got, handle = store.get(ref)
    assert got["x"].is_contiguous() and torch.equal(got["x"], base.t())
    store.release(handle)


def test_bookkeeping_stays_bounded_over_a_long_run(monkeypatch):
    store = open_store("memory://long")
    monkeypatch.setattr(store, "tombstone_capacity", 8)
    refs = []
    for i in range(50):
        ref = store.put(f"s{i}", {"x": torch.arange(4)})
        store.release(store.get(ref)[1])
        refs.append(ref)
    assert len(store._freed_through) == 8
    assert len(store._leases) == 0 and len(store._lease_counts) == 0
    # Freed refs are refused whether or not their tombstone is still remembered.
    with pytest.raises(NotFoundError, match="released or aborted"):
        store.get(refs[-1])
    with pytest.raises(NotFoundError, match="is not stored here"):
        store.get(refs[0])


def test_handles_of_two_stores_never_collide():
    a, b = open_store("memory://same"), open_store("memory://same")
    ref_a = a.put("s", {"x": torch.arange(3)})
    ref_b = b.put("s", {"x": torch.arange(3)})
    _, handle_a = a.get(ref_a)
    _, handle_b = b.get(ref_b)
    assert handle_a.token != handle_b.token
    b.release(handle_a)  # a foreign handle is not b's lease: nothing happens
    assert b.health().active_leases == 1
    b.release(handle_b)
    a.release(handle_a)
    assert a.health().resident_samples == b.health().resident_samples == 0


def test_a_put_racing_a_get_makes_the_get_stale_not_missing():
    from dataflow.contracts import StaleGenerationError
    from dataflow.contracts.uris import parse_store_uri
    from dataflow.store.memory import MemoryFeatureStore

    class ReputDuringRead(MemoryFeatureStore):
        """Replaces the sample between the get's checks and its read (the race, made certain)."""

        def _read(self, sample_id, generation, wanted):
            self.put(sample_id, {"x": torch.ones(3)})
            return super()._read(sample_id, generation, wanted)

    store = ReputDuringRead(parse_store_uri("memory://race"))
    ref = store.put("s", {"x": torch.zeros(3)})
    with pytest.raises(StaleGenerationError, match=rf"generation {ref.generation} is stale"):
        store.get(ref)
    health = store.health()
    assert (health.active_leases, health.resident_samples) == (0, 1)


def test_bad_options_and_uris_are_refused_by_name():
    cases = [
        ({"budget_bytes": -1}, "budget_bytes must be an int >= 0 or None, got -1"),
        ({"budget_bytes": 1.5}, "budget_bytes must be an int >= 0 or None, got 1.5"),
        ({"max_age_s": "soon"}, "max_age_s must be a number >= 0 or None, got 'soon'"),
        ({"retain_on_release": "yes"}, "retain_on_release must be a bool, got 'yes'"),
        ({"colour": "blue"}, "unexpected keyword argument 'colour'"),
    ]
    for options, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            open_store("memory://opts", **options)
    with pytest.raises(InvalidInputError, match="unknown store scheme 'redis'"):
        open_store("redis://127.0.0.1")


def test_drain_names_the_samples_whose_frees_keep_failing():
    from dataflow.contracts import BackendUnavailableError
    from dataflow.store import FaultInjector

    faults = FaultInjector()
    store = open_store("memory://drain", faults=faults)
    store.put("stuck", {"x": torch.arange(3)})
    faults.fail_next_deletes(10**9)
    store.abort("stuck", "dropped")
    with pytest.raises(BackendUnavailableError, match=r"'stuck' g1: OSError\(.injected failure"):
        store.drain(timeout_s=0, interval_s=0)
    with pytest.raises(InvalidInputError, match="timeout_s >= 0"):
        store.drain(timeout_s=-1)
    faults.clear()
    assert store.drain() == 1


def test_a_puts_ref_is_one_the_validating_constructor_accepts_unchanged():
    # put assembles its ref without SampleRef.__post_init__ (its inputs were checked where they
    # entered): the same fields through the constructor give an equal ref.
    store = open_store("memory://assembled")
    ref = store.put("s-1", eagle_sample(0), {"num_tokens": 8, "tags": ["a", {"b": 1.5}]})
    fields = {f: getattr(ref, f) for f in ref.__dataclass_fields__}
    assert SampleRef(**fields) == ref
    assert ref.metadata["tags"] == ("a", {"b": 1.5}) and ref.num_tokens == 8


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"num_tokens": "8"}, r"metadata\['num_tokens'\] must be an int, got '8'"),
        ({"num_tokens": True}, r"metadata\['num_tokens'\] must be an int, got True"),
        ({"num_tokens": -1}, r"SampleRef.num_tokens must be >= 0, got -1"),
        ({"x": float("nan")}, r"SampleRef.metadata\['x'\] is nan"),
        ({1: "a"}, "SampleRef.metadata has a non-str key 1"),
        ([("a", 1)], "metadata must be a mapping or None, got list"),
    ],
)
def test_bad_metadata_is_refused_before_anything_is_stored(metadata, message):
    store = open_store("memory://badmeta")
    with pytest.raises(InvalidInputError, match=message):
        store.put("s", eagle_sample(0), metadata)
    assert store.health().resident_samples == 0


def test_a_ref_naming_another_store_is_refused_each_time():
    store = open_store("memory://mine")
    other = open_store("memory://theirs").put("s", eagle_sample(0))
    for _ in range(2):  # the parsed form is cached; the refusal is not
        with pytest.raises(InvalidInputError, match="belongs to store 'memory://theirs'"):
            store.get(other)
    bad = SampleRef("s", "nosuch://x", {}, {})
    for _ in range(2):
        with pytest.raises(InvalidInputError, match="nosuch"):
            store.get(bad)
    assert store.health().active_leases == 0


def test_bad_get_and_release_arguments_are_refused_and_lease_nothing():
    # The checks live in BookkeepingStore (shared by every backend); the ref's own specs are
    # handed to the backend as they are, so each refusal must still happen before a lease.
    store = open_store("memory://badget")
    ref = store.put("s", eagle_sample(0))
    described = SampleRef("s", ref.store_uri, {}, {}, generation=ref.generation)
    cases: list[tuple[Any, Any, type[Exception], str]] = [
        ("not a ref", None, InvalidInputError, "get needs a SampleRef, got str"),
        (ref, "hidden_state", InvalidInputError, "names must be a sequence of feature names"),
        (ref, 7, InvalidInputError, "names must be a sequence of feature names"),
        (ref, [], InvalidInputError, "names must not be empty"),
        (described, None, InvalidInputError, "names must not be empty"),
        (ref, ["nope"], NotFoundError, r"has no feature\(s\) \['nope'\]"),
    ]
    for bad_ref, names, error, message in cases:
        with pytest.raises(error, match=message):
            store.get(bad_ref, names)
        assert store.health().active_leases == 0
    with pytest.raises(InvalidInputError, match="release needs a FeatureHandle, got str"):
        store.release("token")  # type: ignore[arg-type]
    got, handle = store.get(ref, ["input_ids"])  # the store still serves the good ref
    assert list(got) == ["input_ids"]
    store.release(handle)
    assert store.health().resident_samples == 0
