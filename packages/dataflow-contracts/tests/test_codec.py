import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dataflow.contracts as c
from dataflow.contracts import (
    FeatureSpec,
    InvalidInputError,
    InvalidRecordError,
    PromptTask,
    SampleRef,
    SchemaVersionError,
    WeightVersion,
)
from dataflow.contracts.codec import SCHEMA_VERSIONS, decode, dumps, encode, loads

from .strategies import ALL


def test_every_record_kind_has_a_strategy():
    assert set(ALL) == set(SCHEMA_VERSIONS)


@pytest.mark.parametrize("kind", sorted(ALL))
def test_round_trip(kind):
    cls = getattr(c, kind)

    @settings(max_examples=60, deadline=None)
    @given(ALL[kind])
    def check(record):
        text = dumps(record)
        again = loads(text, cls)
        assert again == record
        assert dumps(again) == text  # stable text
        assert decode(json.loads(json.dumps(encode(record))), cls) == record

    check()


def ref_dict():
    ref = SampleRef(
        sample_id="s1",
        store_uri="shm://run",
        feature_keys={"input_ids": "s1/input_ids"},
        feature_specs={"input_ids": FeatureSpec("input_ids", (16,), "int64")},
        metadata={"epoch": 0},
    )
    return encode(ref)


def test_newer_schema_refused():
    data = ref_dict()
    data["v"] = SCHEMA_VERSIONS["SampleRef"] + 1
    with pytest.raises(
        SchemaVersionError, match=r"schema version 2, newer than the 1 this reader supports"
    ):
        decode(data, SampleRef)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d.update(kind="PromptTask"),
            "expected a SampleRef record, got kind 'PromptTask'",
        ),
        (lambda d: d.pop("kind"), "got kind None"),
        (lambda d: d.update(v="1"), r"SampleRef.v \(schema version\) must be an int >= 1"),
        (lambda d: d.update(v=0), r"must be an int >= 1, got 0"),
        (lambda d: d.pop("sample_id"), r"SampleRef.sample_id is missing"),
        (lambda d: d.update(surprise=1), r"SampleRef has unknown field\(s\) \['surprise'\]"),
        (lambda d: d.update(generation="3"), r"SampleRef.generation must be an int, got str"),
        (lambda d: d.update(generation=True), r"SampleRef.generation must be an int, got bool"),
        (lambda d: d.update(generation=-1), r"SampleRef.generation must be >= 0"),
        (
            lambda d: d.update(sample_id="..x"),
            r"SampleRef: sample id '..x' must not start with '.'",
        ),
        (lambda d: d.update(feature_keys=[]), r"SampleRef.feature_keys must be an object"),
        (
            lambda d: d["feature_specs"]["input_ids"].update(shape=[16, "x"]),
            r"SampleRef.feature_specs\['input_ids'\].shape\[1\] must be an int",
        ),
        (
            lambda d: d["feature_specs"]["input_ids"].update(dtype="complex64"),
            r"FeatureSpec.dtype 'complex64' of 'input_ids' is not supported",
        ),
        (lambda d: d.update(metadata={"x": float("nan")}), r"SampleRef.metadata\['x'\] is nan"),
        (lambda d: d.update(strategy="medusa"), r"SampleRef.strategy 'medusa' is unknown"),
    ],
)
def test_malformed_fields_refused(mutate, message):
    data = ref_dict()
    mutate(data)
    with pytest.raises(InvalidRecordError, match=message):
        decode(data, SampleRef)


def test_enum_field_checked():
    data = encode(WeightVersion("w1", step=3))
    data["status"] = "live"
    with pytest.raises(
        InvalidRecordError, match=r"WeightVersion.status must be one of \['candidate'"
    ):
        decode(data, WeightVersion)


def test_bad_json_and_non_objects():
    with pytest.raises(InvalidRecordError, match="PromptTask: not valid JSON"):
        loads("{not json", PromptTask)
    with pytest.raises(InvalidRecordError, match="PromptTask must be a JSON object, got list"):
        decode([], PromptTask)
    with pytest.raises(InvalidRecordError, match="not valid JSON"):
        loads(b"\xff\xfe", PromptTask)


def test_non_records_refused():
    with pytest.raises(InvalidInputError, match="cannot encode dict: not a dataflow record"):
        encode({"a": 1})
    with pytest.raises(InvalidInputError, match="cannot decode dict: not a dataflow record"):
        decode({}, dict)


@given(st.integers(1, 3))
def test_older_or_equal_versions_accepted(v):
    data = encode(PromptTask("t1", payload={"input_ids": [1, 2]}))
    data["v"] = min(v, SCHEMA_VERSIONS["PromptTask"])
    assert decode(data, PromptTask).payload["input_ids"] == (1, 2)


@pytest.mark.parametrize("kind", sorted(ALL))
def test_records_pickle_and_stay_frozen(kind):
    # Records cross processes through multiprocessing and torch.distributed object collectives.
    import copy
    import pickle

    @settings(max_examples=25, deadline=None)
    @given(ALL[kind])
    def check(record):
        again = pickle.loads(pickle.dumps(record))
        assert again == record
        assert dumps(again) == dumps(record)
        assert copy.deepcopy(record) == record

    check()


def test_frozen_mappings_refuse_every_mutation():
    ref = decode(ref_dict(), SampleRef)
    mutations = [
        lambda m: m.__setitem__("k", 1),
        lambda m: m.__delitem__("epoch"),
        lambda m: m.update(k=1),
        lambda m: m.pop("epoch"),
        lambda m: m.popitem(),
        lambda m: m.setdefault("k", 1),
        lambda m: m.clear(),
    ]
    for mutate in mutations:
        with pytest.raises(TypeError, match="read-only"):
            mutate(ref.metadata)
    assert dict(ref.metadata) == {"epoch": 0}
    assert json.loads(json.dumps(ref.metadata)) == {"epoch": 0}
