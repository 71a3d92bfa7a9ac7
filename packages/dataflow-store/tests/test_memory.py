"""memory:// passes the conformance suite; its own guarantees: zero-copy get, in-process only."""

from pathlib import Path
from typing import Any

import torch
from conformance import StoreConformance, eagle_sample

from dataflow.contracts import FeatureStore
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
