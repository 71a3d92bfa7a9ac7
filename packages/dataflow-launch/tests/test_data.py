from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataflow.contracts import InvalidInputError, PromptTask
from dataflow.launch.config import DataSection
from dataflow.launch.data import build_tasks, encode_conversation, load_prompts, task_id


def write_lines(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sharegpt(user: str, assistant: str) -> str:
    return json.dumps(
        {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": assistant}]}
    )


def test_demo_prompts_load_with_assistant_only_loss(tokenizer):
    prompts = load_prompts(DataSection(), tokenizer)
    assert len(prompts.prompts) == 400 and not prompts.malformed and not prompts.no_loss
    first = prompts.prompts[0]
    tokens = tokenizer.convert_ids_to_tokens(list(first.input_ids))
    masked = "".join(t for t, m in zip(tokens, first.loss_mask, strict=True) if m)
    # Exactly the assistant replies (content + end-of-turn), never the user's words.
    assert masked.replace("Ġ", " ").replace("Ċ", "\n") == (
        "43 is larger than 15.<|eos|>\n8 times 9 is 72.<|eos|>\n"
    )
    assert first.loss_mask[0] == 0 and tokens[0] == "<|bos|>"


def test_messages_format_equals_sharegpt_format(tmp_path, tokenizer):
    messages = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )
    path = write_lines(tmp_path, [messages, sharegpt("hi", "yo")])
    loaded = load_prompts(DataSection(path=str(path)), tokenizer)
    a, b = loaded.prompts
    assert (a.input_ids, a.loss_mask) == (b.input_ids, b.loss_mask)
    assert (a.line, b.line) == (1, 2)


def test_truncation_to_max_length(tokenizer):
    messages = [
        {"role": "user", "content": "Count from 1 to 9."},
        {"role": "assistant", "content": "1, 2, 3"},
    ]
    ids, mask = encode_conversation(tokenizer, messages, 6)
    assert len(ids) == len(mask) == 6


def test_malformed_lines_are_counted_with_line_numbers(tmp_path, tokenizer):
    lines = [
        sharegpt("a", "b"),
        "{not json",
        json.dumps({"conversations": [{"from": "robot", "value": "x"}]}),
        "",
        json.dumps({"text": "no conversation"}),
        json.dumps({"conversations": [{"from": "human", "value": "only a question"}]}),
        sharegpt("c", "d"),
    ]
    path = write_lines(tmp_path, lines)
    loaded = load_prompts(DataSection(path=str(path), max_malformed_lines=4), tokenizer)
    assert [p.line for p in loaded.prompts] == [1, 7]
    assert [(b.line, b.reason.split(" (")[0]) for b in loaded.malformed] == [
        (2, "not valid JSON"),
        (3, "conversations[0].from 'robot' is not a known role"),
        (5, "has neither 'conversations' nor 'messages'"),
        (6, "has no assistant turn"),
    ]
    assert "4 malformed (lines 2, 3, 5, 6)" in loaded.report()


def test_malformed_lines_over_the_limit_fail_naming_them(tmp_path, tokenizer):
    path = write_lines(tmp_path, [sharegpt("a", "b"), "[1, 2]", "{bad", sharegpt("c", "d")])
    with pytest.raises(InvalidInputError) as info:
        load_prompts(DataSection(path=str(path), max_malformed_lines=1), tokenizer)
    message = str(info.value)
    assert "2 malformed line(s), over the limit of 1" in message
    assert "line 2: expected a JSON object, got list" in message
    assert "line 3: not valid JSON" in message
    assert str(path) in message


def test_token_ids_format(tmp_path, tokenizer):
    lines = [
        json.dumps({"input_ids": [1, 5, 9, 2], "loss_mask": [0, 0, 1, 1]}),
        json.dumps({"input_ids": [1, 7, 8]}),
        json.dumps({"input_ids": [1, 99999]}),
        json.dumps({"input_ids": [1, 2], "loss_mask": [1]}),
        json.dumps({"input_ids": [1, 2], "loss_mask": [0, 0]}),
    ]
    path = write_lines(tmp_path, lines)
    loaded = load_prompts(
        DataSection(path=str(path), format="token_ids", max_malformed_lines=2, max_length=3),
        tokenizer,
    )
    assert [(p.input_ids, p.loss_mask) for p in loaded.prompts] == [
        ((1, 5, 9), (0, 0, 1)),
        ((1, 7, 8), (1, 1, 1)),
    ]
    assert [b.line for b in loaded.malformed] == [3, 4]
    assert "outside the vocabulary" in loaded.malformed[0].reason
    assert loaded.no_loss == (5,)


def test_missing_prompt_file_is_refused(tmp_path, tokenizer):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_prompts(DataSection(path=str(tmp_path / "none.jsonl")), tokenizer)


def test_passes_give_new_task_ids_and_stable_indices(tokenizer):
    prompts = load_prompts(DataSection(max_prompts=5), tokenizer).prompts
    tasks = build_tasks(prompts, run_id="run1", passes=2, max_length=64, target_version="t1")
    assert [t.task_id for t in tasks] == [f"run1-p{p}-{i}" for p in range(2) for i in range(5)]
    assert len({t.task_id for t in tasks}) == 10
    assert all(isinstance(t, PromptTask) and t.target_version == "t1" for t in tasks)
    assert tasks[0].payload["input_ids"] == tasks[5].payload["input_ids"]
    assert tasks[3].metadata == {"line": 4, "pass": 0}


def test_shuffled_passes_are_seeded_and_keep_ids_tied_to_prompts(tokenizer):
    prompts = load_prompts(DataSection(max_prompts=20), tokenizer).prompts
    a = build_tasks(prompts, run_id="r", passes=2, max_length=64, seed=3, shuffle=True)
    b = build_tasks(prompts, run_id="r", passes=2, max_length=64, seed=3, shuffle=True)
    assert [t.task_id for t in a] == [t.task_id for t in b]
    first, second = [t.task_id for t in a[:20]], [t.task_id for t in a[20:]]
    assert [x.split("-")[-1] for x in first] != [x.split("-")[-1] for x in second]
    for task in a:
        index = int(task.task_id.rsplit("-", 1)[1])
        assert list(task.payload["input_ids"]) == list(prompts[index].input_ids)


def test_task_ids_are_validated():
    assert task_id("run", 1, 7) == "run-p1-7"
    with pytest.raises(InvalidInputError):
        task_id("x" * 200, 0, 0)


def test_a_line_that_is_not_utf8_is_counted_as_malformed(tmp_path, tokenizer):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        (sharegpt("a", "b") + "\n").encode()
        + b'{"x": "\xff\xfe"}\n'
        + (sharegpt("c", "d") + "\n").encode()
    )
    loaded = load_prompts(DataSection(path=str(path), max_malformed_lines=1), tokenizer)
    assert [p.line for p in loaded.prompts] == [1, 3]
    assert loaded.malformed[0].line == 2 and loaded.malformed[0].reason.startswith("not UTF-8")
