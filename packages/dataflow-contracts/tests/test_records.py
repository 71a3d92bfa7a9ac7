import dataclasses

import pytest

from dataflow.contracts import (
    DeploymentMode,
    FeatureHandle,
    FeatureSpec,
    InvalidInputError,
    PromptTask,
    SampleRef,
    TrainBatch,
    WeightStatus,
    WeightVersion,
    assert_no_tensors,
)


def spec(name="hidden_state", shape=(1, 8, 16), dtype="bfloat16"):
    return FeatureSpec(name, shape, dtype)


def test_feature_spec_sizes():
    s = spec()
    assert (s.numel, s.nbytes) == (128, 256)
    assert FeatureSpec("x", [2, 3], "int64").shape == (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "float8"}, "FeatureSpec.dtype 'float8' of 'hidden_state' is not supported"),
        ({"shape": (1, -2)}, r"FeatureSpec.shape\[1\] of 'hidden_state' must be an int >= 0"),
        ({"shape": (1, True)}, r"FeatureSpec.shape\[1\]"),
        ({"shape": "1,2"}, "FeatureSpec.shape must be tuple"),
        ({"name": "a/b"}, "feature name 'a/b' contains the forbidden character '/'"),
    ],
)
def test_feature_spec_refusals(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        spec(**kwargs)


def test_sample_ref_is_deeply_read_only():
    ref = SampleRef(
        "s1",
        "memory://",
        feature_keys={"hidden_state": "k"},
        feature_specs={"hidden_state": spec()},
        metadata={"a": [1, {"b": 2}]},
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.generation = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        ref.metadata["a"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        ref.metadata["a"][1]["b"] = 3
    with pytest.raises(TypeError):
        ref.feature_specs["x"] = spec()  # type: ignore[index]
    assert ref.spec_bytes == 256
    assert hash(ref) == hash(dataclasses.replace(ref, metadata={"other": 1}))
    assert_no_tensors(ref, "ref")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_id": "a/b"}, "sample id 'a/b' contains the forbidden character '/'"),
        ({"store_uri": ""}, "SampleRef.store_uri must not be empty"),
        ({"feature_specs": {"other": spec("other")}}, r"specs without keys: \['other'\]"),
        ({"feature_specs": {"hidden_state": spec("x")}}, "describes a feature named 'x'"),
        ({"feature_specs": {"hidden_state": (1, 2)}}, "must be a FeatureSpec, got tuple"),
        ({"generation": -1}, "SampleRef.generation must be >= 0"),
        ({"source_task_id": ".."}, "task id '..' must not start with '.'"),
        ({"metadata": {"t": object()}}, r"SampleRef.metadata\['t'\] holds a builtins.object"),
        ({"metadata": {1: 2}}, "has a non-str key 1"),
        ({"estimated_bytes": 1.5}, "SampleRef.estimated_bytes must be int, got float"),
    ],
)
def test_sample_ref_refusals(kwargs, message):
    base = {
        "sample_id": "s1",
        "store_uri": "memory://",
        "feature_keys": {"hidden_state": "k"},
        "feature_specs": {"hidden_state": spec()},
    }
    base.update(kwargs)
    with pytest.raises(InvalidInputError, match=message):
        SampleRef(**base)


def test_prompt_task_and_handle():
    task = PromptTask("t1", payload={"input_ids": [1, 2, 3]}, max_length=64)
    assert task.payload["input_ids"] == (1, 2, 3)
    with pytest.raises(InvalidInputError, match="PromptTask.max_length must be >= 1"):
        PromptTask("t1", payload={}, max_length=0)
    with pytest.raises(InvalidInputError, match="PromptTask.payload must be a mapping"):
        PromptTask("t1", payload=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="FeatureHandle.token must not be empty"):
        FeatureHandle("s1", 0, "")


def test_frozen_payload_sequences_are_tuples_and_still_checked_element_by_element():
    ids = list(range(300))
    task = PromptTask("t1", payload={"input_ids": ids, "mix": [1, "a", None, True, [2.5]]})
    ids.append(7)  # the task holds its own copy
    assert task.payload["input_ids"] == tuple(range(300))
    assert task.payload["mix"] == (1, "a", None, True, (2.5,))
    again = dataclasses.replace(task, attempt=1)  # re-freezing a frozen payload: same value
    assert again.payload == task.payload
    with pytest.raises(InvalidInputError, match=r"payload\['ids'\]\[2\] is nan"):
        PromptTask("t1", payload={"ids": [1, 2, float("nan")]})
    with pytest.raises(InvalidInputError, match=r"\['ids'\]\[1\] holds a builtins.bytes"):
        PromptTask("t1", payload={"ids": [1, b"x"]})


def test_weight_version_status_and_modes():
    assert WeightVersion("w1", 10, status="active").status is WeightStatus.ACTIVE
    with pytest.raises(InvalidInputError, match="WeightVersion.status 'live' is not one of"):
        WeightVersion("w1", 10, status="live")  # type: ignore[arg-type]
    assert DeploymentMode("disaggregated").durable
    assert not DeploymentMode.LOCAL_COLOCATED.durable


def test_train_batch_is_refused_by_the_guard():
    torch = pytest.importorskip("torch")
    batch = TrainBatch(("s1",), "eagle3", {"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    assert batch.size == 1
    with pytest.raises(TypeError, match=r"at batch.tensors\['input_ids'\]"):
        assert_no_tensors(batch, "batch")


def _ref_fields(ref):
    return {f.name: getattr(ref, f.name) for f in dataclasses.fields(ref)}


def test_from_validated_builds_what_the_constructor_builds():
    checked = SampleRef(
        sample_id="s-1",
        store_uri="memory://m",
        feature_keys={"hidden_state": "s-1/g3/hidden_state"},
        feature_specs={"hidden_state": spec()},
        generation=3,
        num_tokens=8,
        estimated_bytes=256,
        metadata={"k": [1, 2]},
    )
    fast = SampleRef.from_validated(**_ref_fields(checked))
    assert fast == checked and repr(fast) == repr(checked) and hash(fast) == hash(checked)
    assert fast.spec_bytes == 256
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.generation = 4  # type: ignore[misc]
    # defaults are filled in as the constructor fills them
    minimal = SampleRef.from_validated(
        sample_id="s", store_uri="memory://m", feature_keys={}, feature_specs={}
    )
    assert minimal == SampleRef("s", "memory://m", {}, {})
    assert FeatureSpec.from_validated("x", (2, 3), "int64") == FeatureSpec("x", (2, 3), "int64")
    assert FeatureHandle.from_validated("s", 2, "t") == FeatureHandle("s", 2, "t")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"sample_id": "s"},
            r"missing field\(s\) \['feature_keys', 'feature_specs', 'store_uri'\]",
        ),
        (
            {
                "sample_id": "s",
                "store_uri": "m://",
                "feature_keys": {},
                "feature_specs": {},
                "x": 1,
            },
            r"unknown field\(s\) \['x'\]",
        ),
    ],
)
def test_from_validated_refuses_unknown_and_missing_fields(values, message):
    with pytest.raises(TypeError, match=message):
        SampleRef.from_validated(**values)
