from __future__ import annotations

import pytest
import torch
from launch_helpers import TINY, make_tasks

from dataflow.contracts import InvalidInputError, PromptTask, SchemaMismatchError
from dataflow.launch.builtin.target import build_builtin_target
from dataflow.launch.config import BuiltinTargetSection, TargetSection
from dataflow.launch.engines import (
    FEATURE_NAMES,
    TargetEngine,
    check_features,
    default_aux_layer_ids,
    open_engine,
    resolve_aux_layer_ids,
)
from dataflow.launch.engines.features import batch_finite
from dataflow.launch.engines.hf import open_hf_engine


def test_builtin_target_is_fixed_by_its_seed_and_leaves_global_rng_alone():
    section = BuiltinTargetSection(**TINY, seed=7)
    rng_before = torch.get_rng_state()
    a, _ = build_builtin_target(section, torch.float32)
    b, _ = build_builtin_target(section, torch.float32)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    c, _ = build_builtin_target(section.model_copy(update={"seed": 8}), torch.float32)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_engine_satisfies_protocol_and_reports_target_info(tiny_engine):
    assert isinstance(tiny_engine, TargetEngine)
    info = tiny_engine.info
    assert (info.hidden_size, info.num_layers, info.dtype) == (32, 8, "float32")
    assert info.aux_layer_ids == (1, 3, 4)
    assert info.vocab_size == len(tiny_engine.tokenizer)
    assert info.version.startswith("builtin-")
    head = tiny_engine.target_head()
    assert head.embed_weight.shape == head.lm_head_weight.shape == (info.vocab_size, 32)
    assert not head.lm_head_weight.requires_grad
    assert head.model_config["hidden_size"] == 32 and head.model_config["num_hidden_layers"] == 8


def test_target_head_builds_the_trainers_draft_config(tiny_engine):
    from dataflow.train.eagle3 import Eagle3Config, Eagle3Objective

    head = tiny_engine.target_head()
    config = Eagle3Config.from_target_config(head.model_config, draft_vocab_size=256)
    assert config.target_layers == tiny_engine.info.aux_layer_ids
    assert (config.hidden_size, config.vocab_size) == (32, tiny_engine.info.vocab_size)
    objective = Eagle3Objective(config)
    objective.init_from_target(head.embed_weight, head.lm_head_weight)
    assert torch.equal(objective.target_head.weight, head.lm_head_weight)


def test_capture_gives_four_checked_features_per_task(tiny_engine):
    tasks = make_tasks(tiny_engine, 5)
    samples = tiny_engine.capture(tasks)
    assert [s.task_id for s in samples] == [t.task_id for t in tasks]
    for task, sample in zip(tasks, samples, strict=True):
        n = len(task.payload["input_ids"])
        assert tuple(sample.tensors) == FEATURE_NAMES
        assert sample.num_tokens == n
        specs = tiny_engine.feature_specs(n)
        assert {k: v.shape for k, v in specs.items()} == {
            "input_ids": (1, n),
            "loss_mask": (1, n),
            "hidden_state": (1, n, 32),
            "aux_hidden_state": (1, n, 96),
        }
        assert sample.tensors["input_ids"][0].tolist() == list(task.payload["input_ids"])
        assert sample.tensors["loss_mask"][0].tolist() == list(task.payload["loss_mask"])
        assert sample.nbytes == sum(s.nbytes for s in specs.values())


def test_captured_layers_follow_the_rule_and_last_state_is_post_norm(tiny_engine):
    task = make_tasks(tiny_engine, 1)[0]
    sample = tiny_engine.capture([task])[0]
    ids = sample.tensors["input_ids"]
    with torch.no_grad():
        out = tiny_engine.model(input_ids=ids, output_hidden_states=True)
        base = tiny_engine.model.model(input_ids=ids)
    # Layer k = output of decoder layer k = HF's hidden_states[k + 1].
    expected_aux = torch.cat([out.hidden_states[k + 1] for k in (1, 3, 4)], dim=-1)
    torch.testing.assert_close(sample.tensors["aux_hidden_state"], expected_aux)
    # The last hidden state is the base model's post-norm output: what feeds the LM head.
    torch.testing.assert_close(sample.tensors["hidden_state"], base.last_hidden_state)
    torch.testing.assert_close(
        tiny_engine.model.lm_head(sample.tensors["hidden_state"]), out.logits
    )
    # ...and not the pre-norm residual stream of the last layer.
    normed_again = tiny_engine.model.model.norm(sample.tensors["hidden_state"])
    assert not torch.allclose(normed_again, sample.tensors["hidden_state"])


def test_capture_is_deterministic_and_batching_matches_single(tiny_engine):
    tasks = make_tasks(tiny_engine, 4)
    first = tiny_engine.capture(tasks)
    again = tiny_engine.capture(tasks)
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in FEATURE_NAMES)
    single = [tiny_engine.capture([t])[0] for t in tasks]
    for a, b in zip(first, single, strict=True):
        for name in FEATURE_NAMES:
            torch.testing.assert_close(a.tensors[name], b.tensors[name], rtol=1e-5, atol=1e-5)


def test_messages_payload_is_rendered_with_the_chat_template(tiny_engine):
    messages = [
        {"role": "user", "content": "Name 2 fruits."},
        {"role": "assistant", "content": "pear, plum."},
    ]
    task = PromptTask("m-1", {"messages": messages}, max_length=64)
    sample = tiny_engine.capture([task])[0]
    mask = sample.tensors["loss_mask"][0].tolist()
    assert 0 < sum(mask) < len(mask) and mask[0] == 0


def test_bad_payload_names_the_task_before_any_compute(tiny_engine):
    good = make_tasks(tiny_engine, 1)[0]
    bad = PromptTask("bad-7", {"input_ids": [1, 10_000_000]}, max_length=8)
    with pytest.raises(InvalidInputError, match=r"task 'bad-7': token id 10000000 is outside"):
        tiny_engine.capture([good, bad])
    with pytest.raises(InvalidInputError, match=r"task 'bad-8': payload needs 'input_ids'"):
        tiny_engine.capture([PromptTask("bad-8", {"text": "hi"})])


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidInputError, match=r"target.model_dir '.*nowhere' does not exist"):
        open_engine(TargetSection(model_dir=str(tmp_path / "nowhere")))
    with pytest.raises(InvalidInputError, match="is not a model directory: it has no config.json"):
        open_engine(TargetSection(model_dir=str(tmp_path)))


def test_local_model_directory_gives_the_same_features(tiny_engine, saved_model_dir):
    engine = open_hf_engine(
        TargetSection(model_dir=str(saved_model_dir), dtype="float32", batch_size=3)
    )
    assert engine.info.version == saved_model_dir.name
    tasks = make_tasks(tiny_engine, 3)
    for a, b in zip(engine.capture(tasks), tiny_engine.capture(tasks), strict=True):
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in FEATURE_NAMES)
    assert len(engine.tokenizer) == len(tiny_engine.tokenizer)


def test_aux_layer_rule():
    assert default_aux_layer_ids(32) == (1, 15, 28)
    assert default_aux_layer_ids(8) == (1, 3, 4)
    with pytest.raises(InvalidInputError, match=r"gives layers \[1, 1, 0\] for a 4-layer target"):
        default_aux_layer_ids(4)
    assert resolve_aux_layer_ids(4, (0, 1, 2)) == (0, 1, 2)
    with pytest.raises(InvalidInputError, match=r"three distinct layers in \[0, 4\)"):
        resolve_aux_layer_ids(4, (0, 1, 4))


def test_feature_check_refuses_wrong_shapes_dtypes_and_nan(tiny_engine):
    sample = tiny_engine.capture(make_tasks(tiny_engine, 1))[0]
    specs = tiny_engine.feature_specs(sample.num_tokens)
    tensors = dict(sample.tensors)
    check_features("ok", tensors, specs)
    wrong = {**tensors, "aux_hidden_state": tensors["aux_hidden_state"][..., :64]}
    with pytest.raises(
        SchemaMismatchError, match=r"task 'x': feature 'aux_hidden_state' is float32"
    ):
        check_features("x", wrong, specs)
    cast = {**tensors, "hidden_state": tensors["hidden_state"].to(torch.bfloat16)}
    with pytest.raises(SchemaMismatchError, match="is bfloat16"):
        check_features("x", cast, specs)
    nan = {**tensors, "hidden_state": tensors["hidden_state"].clone()}
    nan["hidden_state"][0, 0, 0] = float("nan")
    with pytest.raises(SchemaMismatchError, match="NaN or inf"):
        check_features("x", nan, specs)
    missing = {k: v for k, v in tensors.items() if k != "loss_mask"}
    with pytest.raises(SchemaMismatchError, match="captured features"):
        check_features("x", missing, specs)


def test_batch_finiteness_is_certain_when_true_and_checked_per_sample_when_not(tiny_engine):
    sample = tiny_engine.capture(make_tasks(tiny_engine, 1))[0]
    assert sample.values_checked  # the producer then reads no value of it again
    specs = tiny_engine.feature_specs(sample.num_tokens)
    tensors = dict(sample.tensors)
    assert batch_finite(tensors["hidden_state"], tensors["aux_hidden_state"])
    big = {**tensors, "hidden_state": torch.full_like(tensors["hidden_state"], 3e38)}
    assert not batch_finite(big["hidden_state"])  # the sum overflows: a false alarm ...
    check_features("x", big, specs)  # ... which the exact check clears
    nan = {**tensors, "aux_hidden_state": tensors["aux_hidden_state"].clone()}
    nan["aux_hidden_state"][0, -1, -1] = float("nan")
    assert not batch_finite(tensors["hidden_state"], nan["aux_hidden_state"])
    bad_mask = {**tensors, "loss_mask": torch.full_like(tensors["loss_mask"], 2)}
    with pytest.raises(SchemaMismatchError, match="loss_mask"):  # known_finite skips NaN only
        check_features("x", bad_mask, specs, known_finite=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_refused(tiny_target):
    with pytest.raises(InvalidInputError, match="CUDA is not available"):
        open_hf_engine(tiny_target.model_copy(update={"device": "cuda"}))
