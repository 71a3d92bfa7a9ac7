"""Online regeneration on the hf engine: the target writes the response, features cover
prompt + response from one forward, the loss mask covers the generated tokens only."""

from __future__ import annotations

import json

import pytest
import torch

from dataflow.contracts import InvalidInputError, PromptTask
from dataflow.launch.config import DataSection
from dataflow.launch.data import build_tasks, load_prompts
from dataflow.launch.engines import Regeneration, open_engine
from dataflow.launch.engines.generate import task_seed

MAX_LENGTH = 48
NEW = 12


def prompt_tasks(tokenizer, count: int, *, run_id: str = "rg"):
    prompts = load_prompts(
        DataSection(max_prompts=count, max_length=MAX_LENGTH), tokenizer, regenerate_tokens=NEW
    )
    return build_tasks(prompts.prompts, run_id=run_id, passes=1, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def greedy_engine(tiny_target):
    engine = open_engine(tiny_target, regeneration=Regeneration(max_new_tokens=NEW))
    yield engine
    engine.close()


def sampled(tiny_target, seed: int):
    return open_engine(
        tiny_target, regeneration=Regeneration(max_new_tokens=NEW, temperature=1.0, seed=seed)
    )


def reference_features(base, ids, layers):
    """The last hidden state and the aux layers of one plain forward over ``ids``."""
    captured = {}

    def recorder(layer):
        def hook(_module, _inputs, out):
            captured[layer] = out[0] if isinstance(out, tuple) else out

        return hook

    hooks = [base.layers[k].register_forward_hook(recorder(k)) for k in layers]
    try:
        with torch.no_grad():
            last = base(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
    return last, torch.cat([captured[k] for k in layers], dim=-1)


def test_data_side_gives_prompt_only_payloads_ending_at_the_assistant_turn(tokenizer):
    prompts = load_prompts(DataSection(max_length=MAX_LENGTH), tokenizer, regenerate_tokens=NEW)
    assert len(prompts.prompts) == 400  # one task per conversation, multi-turn ones included
    marker = tokenizer("<|assistant|>\n", add_special_tokens=False)["input_ids"]
    for prompt in prompts.prompts:
        assert not any(prompt.loss_mask)
        assert len(prompt.input_ids) + NEW <= MAX_LENGTH
        assert list(prompt.input_ids[-len(marker) :]) == marker
    first = tokenizer.decode(list(prompts.prompts[0].input_ids))
    assert "Which is larger, 15 or 43?" in first and "43 is larger" not in first
    assert "Multiply 8 by 9" not in first  # later turns are dropped


def test_prompts_that_leave_no_room_for_the_response_are_skipped_and_reported(tokenizer):
    loaded = load_prompts(DataSection(max_length=30), tokenizer, regenerate_tokens=16)
    assert loaded.too_long and all(len(p.input_ids) <= 14 for p in loaded.prompts)
    assert "too long to leave room for the response" in loaded.report()


def test_greedy_regeneration_equals_transformers_generate_then_one_forward(
    greedy_engine, tokenizer
):
    tasks = prompt_tasks(tokenizer, 4)
    samples = greedy_engine.capture(tasks)
    model = greedy_engine.model
    base = model.model
    for task, sample in zip(tasks, samples, strict=True):
        prompt = torch.tensor([task.payload["input_ids"]])
        generated = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=NEW,
            eos_token_id=2,
            pad_token_id=0,
        )
        full = generated[:, :MAX_LENGTH]
        assert full.shape[1] > prompt.shape[1]
        assert torch.equal(sample.tensors["input_ids"], full)
        n_new = full.shape[1] - prompt.shape[1]
        expected_mask = [0] * prompt.shape[1] + [1] * n_new
        assert sample.tensors["loss_mask"].tolist() == [expected_mask]
        last, aux = reference_features(base, full, greedy_engine.info.aux_layer_ids)
        torch.testing.assert_close(sample.tensors["hidden_state"], last, rtol=0, atol=1e-5)
        torch.testing.assert_close(sample.tensors["aux_hidden_state"], aux, rtol=0, atol=1e-5)


def test_greedy_regeneration_is_deterministic(greedy_engine, tokenizer):
    tasks = prompt_tasks(tokenizer, 2)
    a, b = greedy_engine.capture(tasks), greedy_engine.capture(tasks)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.tensors["input_ids"], y.tensors["input_ids"])


def test_sampled_regeneration_reproduces_with_its_seed_and_differs_across_seeds(
    tiny_target, tokenizer
):
    tasks = prompt_tasks(tokenizer, 4)
    runs = {}
    for name, seed in (("a", 1), ("again", 1), ("b", 2)):
        engine = sampled(tiny_target, seed)
        try:
            torch.manual_seed(12345 if name == "again" else 0)  # the global RNG plays no part
            runs[name] = [s.tensors["input_ids"].tolist() for s in engine.capture(tasks)]
        finally:
            engine.close()
    assert runs["a"] == runs["again"]
    assert runs["a"] != runs["b"]
    greedy_ids = [t.payload["input_ids"] for t in tasks]
    for ids, prompt in zip(runs["a"], greedy_ids, strict=True):
        assert ids[0][: len(prompt)] == list(prompt) and len(ids[0]) > len(prompt)


def test_a_retried_task_writes_the_same_response_in_any_batch(tiny_target, tokenizer):
    tasks = prompt_tasks(tokenizer, 3)
    engine = sampled(tiny_target, 5)
    try:
        together = engine.capture(tasks)
        alone = engine.capture([tasks[2]])
    finally:
        engine.close()
    assert torch.equal(together[2].tensors["input_ids"], alone[0].tensors["input_ids"])
    assert task_seed(5, tasks[2].task_id) == task_seed(5, tasks[2].task_id)
    assert task_seed(5, tasks[0].task_id) != task_seed(5, tasks[1].task_id)


def test_messages_payload_is_cut_to_its_prompt(greedy_engine, tokenizer):
    messages = [
        {"role": "user", "content": "What color is grass?"},
        {"role": "assistant", "content": "Grass is usually green."},
    ]
    task = PromptTask("m1", {"messages": messages}, max_length=MAX_LENGTH)
    (sample,) = greedy_engine.capture([task])
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = sample.tensors["input_ids"][0].tolist()
    assert ids[: len(prompt_ids)] == prompt_ids
    mask = sample.tensors["loss_mask"][0].tolist()
    assert mask == [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))


def test_a_prompt_with_no_room_to_generate_is_refused_naming_the_task(greedy_engine):
    task = PromptTask("full", {"input_ids": [5] * 8, "loss_mask": [0] * 8}, max_length=8)
    with pytest.raises(InvalidInputError, match="'full'.*no room to generate"):
        greedy_engine.capture([task])


def test_sglang_engine_refuses_regeneration(tmp_path):
    from dataflow.launch.config import TargetSection

    target = TargetSection(
        engine="sglang",
        model_dir=str(tmp_path),
        server_url="http://127.0.0.1:1",
        aux_server_url="http://127.0.0.1:2",
    )
    with pytest.raises(InvalidInputError, match="producer.regenerate"):
        open_engine(target, regeneration=Regeneration(max_new_tokens=4))


def test_token_ids_records_keep_the_prompt_before_the_first_loss_token(tmp_path, tokenizer):
    path = tmp_path / "ids.jsonl"
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "loss_mask": [0, 0, 0, 1, 1]},
        {"input_ids": [5, 6], "loss_mask": [1, 1]},
        {"input_ids": [5, 6]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataSection(path=str(path), format="token_ids", max_length=16, max_malformed_lines=2)
    loaded = load_prompts(data, tokenizer, regenerate_tokens=4)
    assert [p.input_ids for p in loaded.prompts] == [(5, 6, 7)]
    assert [p.loss_mask for p in loaded.prompts] == [(0, 0, 0)]
    reasons = {b.line: b.reason for b in loaded.malformed}
    assert "starts with 1" in reasons[2] and "needs a loss_mask" in reasons[3]


def test_the_run_engine_regenerates_per_the_producer_section(tiny_target):
    from dataflow.launch.config import LaunchConfig
    from dataflow.launch.producer import engine_regeneration, open_run_engine

    config = LaunchConfig(
        run={"seed": 3},
        target=tiny_target,
        producer={"regenerate": True, "max_new_tokens": 8, "temperature": 0.7},
    )
    engine = open_run_engine(config)
    try:
        assert engine.regeneration == Regeneration(max_new_tokens=8, temperature=0.7, seed=3)
    finally:
        engine.close()
    off = config.model_copy(
        update={"producer": config.producer.model_copy(update={"regenerate": False})}
    )
    assert engine_regeneration(off) is None


def test_regeneration_settings_are_part_of_the_run_fingerprint():
    from dataflow.launch.config import fingerprint, load_config

    off = fingerprint(load_config(None, []))
    assert fingerprint(load_config(None, ["producer.max_new_tokens=9"])) == off  # inert when off
    on = fingerprint(load_config(None, ["producer.regenerate=true"]))
    assert on != off
    assert (
        fingerprint(load_config(None, ["producer.regenerate=true", "producer.max_new_tokens=9"]))
        != on
    )
    assert (
        fingerprint(load_config(None, ["producer.regenerate=true", "producer.temperature=0.5"]))
        != on
    )
    assert fingerprint(load_config(None, ["producer.regenerate=true", "producer.workers=3"])) == on


def test_config_refuses_regeneration_it_cannot_honour():
    from pydantic import ValidationError

    from dataflow.launch.config import load_config

    with pytest.raises((ValidationError, InvalidInputError), match="producer.max_new_tokens"):
        load_config(None, ["producer.regenerate=true", "data.max_length=64"])
