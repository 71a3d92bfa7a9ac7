from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from dataflow.contracts import FeatureSpec, SampleRef, assert_no_tensors
from dataflow.contracts.no_tensors import looks_like_tensor


@dataclass
class Holder:
    name: str
    payload: object = None
    extra: dict = field(default_factory=dict)


def make_ref(metadata):
    return SampleRef(
        sample_id="s-1",
        store_uri="memory://",
        feature_keys={"hidden_state": "s-1/hidden_state"},
        feature_specs={"hidden_state": FeatureSpec("hidden_state", (1, 4, 8), "bfloat16")},
        metadata=metadata,
    )


def test_plain_metadata_passes():
    ref = make_ref({"x": [1, 2.5, "a", None, True, {"y": ["raw", (3, 4)]}]})
    assert_no_tensors(ref, "ref")
    assert_no_tensors({"a": {1, 2, frozenset({3})}, "b": (1, [2, [b"raw"]])})
    assert_no_tensors(np.float64(1.5))  # a float subclass: a number, not an array


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"x": [0, 1, torch.zeros(2)]}, "value['x'][2]"),
        ([1, (2, {"k": np.zeros(3)})], "value[1][1]['k']"),
        ((torch.ones(1),), "value[0]"),
        (Holder("h", payload=[np.int64(3)]), "value.payload[0]"),
        (
            Holder("h", extra={"deep": Holder("i", payload=torch.tensor(1.0))}),
            "value.extra['deep'].payload",
        ),
        ({"nested": {"list": [[], [torch.Size([2, 3])]]}}, "value['nested']['list'][1][0]"),
        ([{torch.float32: 1}], "value[0].keys()[torch.float32]"),
    ],
)
def test_tensor_reported_with_its_path(value, path):
    with pytest.raises(TypeError) as info:
        assert_no_tensors(value)
    assert f" at {path}:" in str(info.value)


def test_tensor_inside_a_real_ref_names_the_field_path():
    # SampleRef freezes metadata and would refuse a tensor itself (not JSON); so build the
    # structure the way a caller would before constructing the record.
    raw = {"metadata": {"x": [1, 2, torch.zeros(3)]}}
    with pytest.raises(TypeError, match=r"at ref\['metadata'\]\['x'\]\[2\]: .*torch\.Tensor"):
        assert_no_tensors(raw, "ref")


def test_tensor_in_dataclass_record_field():
    holder = Holder("h", payload={"x": [0, 1, np.ones(2)]})
    with pytest.raises(TypeError, match=r"at holder\.payload\['x'\]\[2\]: .*numpy\.ndarray"):
        assert_no_tensors(holder, "holder")


def test_first_offender_in_order_is_reported():
    with pytest.raises(TypeError, match=r"at value\[1\]:"):
        assert_no_tensors([0, torch.zeros(1), np.zeros(1)])


def test_tensor_in_set_is_found():
    class Hashable:
        dtype = "f"
        shape = (1,)
        device = "cpu"

    with pytest.raises(TypeError, match=r"tests\.test_no_tensors|test_no_tensors"):
        assert_no_tensors({"s": {Hashable()}})


def test_duck_typed_and_library_values():
    assert looks_like_tensor(torch.zeros(1))
    assert looks_like_tensor(np.zeros(1))
    assert looks_like_tensor(np.int64(1))
    assert not looks_like_tensor(3)
    assert not looks_like_tensor("tensor")
    assert not looks_like_tensor(object())


def test_cycles_terminate():
    a: list = [1]
    a.append(a)
    assert_no_tensors(a)
    a.append(torch.zeros(1))
    with pytest.raises(TypeError, match=r"value\[2\]"):
        assert_no_tensors(a)


def test_long_list_reports_exact_index():
    data = list(range(5000))
    data[4096] = torch.zeros(1)
    with pytest.raises(TypeError, match=r"at value\[4096\]:"):
        assert_no_tensors(data)
