"""The durable ledgers store refs in the contracts' own JSON format, and refuse damaged text."""

from __future__ import annotations

import json

import pytest
from ledger_conformance import make_ref

from dataflow.contracts import CorruptRecordError, FeatureSpec, SampleRef
from dataflow.contracts.codec import dumps, loads
from dataflow.control.ledger._serial import decode_ref, encode_ref


def _refs() -> list[SampleRef]:
    plain = make_ref(1)
    rich = SampleRef(
        sample_id="s:rich@1",
        store_uri="mooncake://127.0.0.1:50051",
        feature_keys={"a": "k/a", "b": "k/b", "extra": "k/extra"},
        feature_specs={
            "a": FeatureSpec("a", (3, 0, 7), "float32"),
            "b": FeatureSpec("b", (), "int8"),
        },
        generation=9,
        source_task_id="t-1",
        run_id="run",
        estimated_bytes=12,
        num_tokens=3,
        target_version="tv",
        draft_weight_version=None,
        metadata={"nested": {"list": [1, 2.5, None, True, "x", {"deep": []}]}, "empty": {}},
    )
    return [plain, rich]


@pytest.mark.parametrize("ref", _refs(), ids=["plain", "rich"])
def test_encoding_is_the_codecs_and_round_trips(ref: SampleRef) -> None:
    text = encode_ref(ref)
    assert json.loads(text) == json.loads(dumps(ref))
    assert decode_ref(text, "here") == ref
    assert loads(text, SampleRef) == ref


def test_other_schema_versions_go_through_the_strict_codec() -> None:
    data = json.loads(encode_ref(make_ref(1)))
    data["v"] = 99
    with pytest.raises(
        CorruptRecordError, match="row 7: stored ref does not decode.*schema version 99"
    ):
        decode_ref(json.dumps(data), "row 7")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "Expecting property name"),
        ('{"kind": "SampleRef", "v": 1}', "missing"),
        (encode_ref(make_ref(1)).replace('"s00001"', '"../x"', 1), "forbidden character"),
        (encode_ref(make_ref(1)).replace('"shape":[4,8]', '"shape":"wide"'), "shape"),
    ],
)
def test_damaged_text_is_a_corrupt_record(text: str, problem: str) -> None:
    with pytest.raises(CorruptRecordError, match=problem):
        decode_ref(text, "row 1")


@pytest.mark.parametrize("ref", _refs(), ids=["plain", "rich"])
def test_the_packed_form_round_trips_with_and_without_a_crc(ref: SampleRef) -> None:
    from dataflow.control.ledger._packed import pack_ref, read_ref, unpack_ref
    from dataflow.control.ledger._serial import ref_crc

    text = pack_ref(ref)
    assert text.startswith("[") and len(text) < len(encode_ref(ref))
    assert read_ref(text, ref_crc(text), ref.sample_id, "here") == ref
    assert read_ref(text, None, ref.sample_id, "here") == ref  # full validation
    assert unpack_ref(text, "here") == ref


def test_values_orjson_refuses_still_round_trip() -> None:
    # Beyond 64 bits (json takes them; orjson, where installed, refuses) and non-ASCII text.
    from dataflow.control.ledger._packed import pack_ref, read_ref
    from dataflow.control.ledger._serial import decode_checked_ref, ref_crc

    ref = SampleRef(
        sample_id="s-big",
        store_uri="memory://x",
        feature_keys={"a": "k/a"},
        feature_specs={"a": FeatureSpec("a", (2,), "int8")},
        metadata={"big": 2**70, "text": "näive ☃", "neg": -(2**65)},
    )
    for text, read in (
        (encode_ref(ref), decode_checked_ref),
        (pack_ref(ref), read_ref),
    ):
        assert read(text, ref_crc(text), "s-big", "here") == ref


def test_a_damaged_packed_text_without_a_crc_is_a_corrupt_record() -> None:
    from dataflow.control.ledger._packed import pack_ref, read_ref

    good = pack_ref(make_ref(1))
    for text, problem in (
        (good.replace('"s00001"', '"../x"', 1), "forbidden character"),
        (good.replace("[4,8]", '"wide"'), "spec"),
        (good[:-1] + ',"extra"]', "not this ledger's packed"),
        ("[1,2", "does not decode"),
    ):
        with pytest.raises(CorruptRecordError, match=problem):
            read_ref(text, None, "s00001", "row 1")
