"""The stored byte layout: safetensors-compatible, aligned, and strict about what it parses."""

from __future__ import annotations

import contextlib
import json
import struct

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load

from dataflow.contracts import CorruptRecordError, FeatureSpec, SchemaMismatchError
from dataflow.contracts.features import DTYPE_ITEMSIZE
from dataflow.store.layout import ALIGN, check_against, plan, read_header, view
from dataflow.store.tensors import TORCH_DTYPES


def framed(header: object) -> bytes:
    """A blob whose length prefix matches a JSON header, followed by a few data bytes."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + bytes(16)


names = st.text("abcdefgh_", min_size=1, max_size=8).filter(lambda n: n[0] != "_")
specs = st.dictionaries(
    names,
    st.tuples(st.sampled_from(sorted(DTYPE_ITEMSIZE)), st.lists(st.integers(0, 5), max_size=3)),
    min_size=1,
    max_size=6,
).map(lambda d: [FeatureSpec(n, tuple(shape), dtype) for n, (dtype, shape) in d.items()])


def blob_for(layout_specs: list[FeatureSpec], seed: int) -> tuple[bytes, dict[str, torch.Tensor]]:
    layout = plan(layout_specs, {"k": "v"})
    blob = bytearray(layout.total_bytes)
    blob[: len(layout.header)] = layout.header
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for spec in layout_specs:
        entry = layout.entries[spec.name]
        raw = torch.randint(0, 256, (spec.nbytes,), dtype=torch.uint8, generator=gen)
        blob[entry.start : entry.end] = raw.numpy().tobytes()
        if spec.dtype == "bool":
            raw = raw % 2
            blob[entry.start : entry.end] = raw.numpy().tobytes()
        tensors[spec.name] = raw.view(TORCH_DTYPES[spec.dtype]).reshape(spec.shape)
    return bytes(blob), tensors


@settings(max_examples=60, deadline=None)
@given(specs, st.integers(0, 1000))
def test_planned_layout_round_trips_and_is_read_by_safetensors(layout_specs, seed):
    blob, tensors = blob_for(layout_specs, seed)
    parsed = read_header(blob, len(blob), "blob")
    assert {n: e.spec for n, e in parsed.entries.items()} == {s.name: s for s in layout_specs}
    assert parsed.metadata == {"k": "v"}
    assert len(parsed.header) % ALIGN == 0
    for name, entry in parsed.entries.items():
        assert entry.start % DTYPE_ITEMSIZE[entry.spec.dtype] == 0  # viewable in place
        got = view(bytearray(blob), entry)
        assert torch.equal(
            got.view(-1).view(torch.uint8), tensors[name].reshape(-1).view(torch.uint8)
        )
    theirs = load(blob)
    assert sorted(theirs) == sorted(tensors)


@settings(max_examples=60, deadline=None)
@given(specs, st.data())
def test_any_changed_spec_is_a_schema_mismatch(layout_specs, data):
    layout = plan(layout_specs)
    victim = data.draw(st.sampled_from(layout_specs))
    shape = data.draw(st.lists(st.integers(0, 5), max_size=3).map(tuple))
    dtype = data.draw(st.sampled_from(sorted(DTYPE_ITEMSIZE)))
    changed = FeatureSpec(victim.name, shape, dtype)
    wanted = {s.name: (changed if s.name == victim.name else s) for s in layout_specs}
    if changed == victim:
        check_against(layout, wanted, "blob")
        return
    try:
        check_against(layout, wanted, "blob")
    except SchemaMismatchError as exc:
        assert f"feature {victim.name!r}" in str(exc)
    else:
        raise AssertionError("a changed spec was accepted")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256) | st.dictionaries(st.text(max_size=6), json_values).map(framed))
def test_garbage_is_refused_as_corrupt_never_with_anything_else(garbage):
    # Any outcome but a parsed layout or CorruptRecordError (KeyError, TypeError, ...) fails.
    with contextlib.suppress(CorruptRecordError):
        layout = read_header(garbage, len(garbage), "garbage")
        for entry in layout.entries.values():
            assert entry.end <= len(garbage)


def test_corrupt_headers_name_the_problem():
    layout = plan([FeatureSpec("a", (4,), "int64"), FeatureSpec("b", (2,), "int32")])
    blob = layout.header + bytes(layout.total_bytes - len(layout.header))
    for cut, message in ((4, "too short"), (len(blob) - 1, "lie outside")):
        try:
            read_header(blob[:cut], cut, "f")
        except CorruptRecordError as exc:
            assert message in str(exc)
        else:
            raise AssertionError(f"cut at {cut} accepted")
