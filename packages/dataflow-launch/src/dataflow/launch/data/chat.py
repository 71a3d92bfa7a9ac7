"""Conversations: normalising ShareGPT / messages records and tokenising them with a loss mask.

With regeneration (``producer.regenerate``) a conversation is cut to its prompt instead: the
turns before its first assistant turn, rendered with the template's generation prompt (so the
text ends where the assistant's turn starts), loss mask all 0; the target writes the reply.
Later turns are dropped: one task per conversation, whose prompt is its first user turn(s).

The loss mask is 1 exactly on the tokens of assistant turns (their content and end-of-turn
marker), found by rendering the chat template on growing prefixes of the conversation and
mapping the assistant character spans onto token offsets. This works for any fast tokenizer
whose chat template renders a conversation's prefix as a string prefix of the whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dataflow.contracts import InvalidInputError
from dataflow.launch.data.jsonl import MalformedRecord

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}
_ROLES = ("system", "user", "assistant")


def _turns(record: Mapping[str, Any]) -> tuple[list[Any], str, str, str]:
    if "conversations" in record:
        return record["conversations"], "from", "value", "conversations"
    if "messages" in record:
        return record["messages"], "role", "content", "messages"
    raise MalformedRecord("has neither 'conversations' nor 'messages'")


def normalise_conversation(record: Any, *, need_assistant: bool = True) -> list[dict[str, str]]:
    """``[{"role", "content"}, …]`` from a ShareGPT (``conversations``: from/value) or chat
    (``messages``: role/content) record; raises :class:`MalformedRecord` saying what is wrong.
    ``need_assistant=False`` accepts a prompt-only record (the target writes the reply).
    """
    if not isinstance(record, dict):
        raise MalformedRecord(f"expected a JSON object, got {type(record).__name__}")
    turns, role_key, text_key, field = _turns(record)
    if not isinstance(turns, list) or not turns:
        raise MalformedRecord(f"'{field}' must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise MalformedRecord(f"{field}[{i}] must be an object")
        raw_role, text = turn.get(role_key), turn.get(text_key)
        role = _SHAREGPT_ROLES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise MalformedRecord(f"{field}[{i}].{role_key} {raw_role!r} is not a known role")
        if not isinstance(text, str):
            raise MalformedRecord(f"{field}[{i}].{text_key} must be a string")
        messages.append({"role": role, "content": text})
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise MalformedRecord("has no assistant turn")
    return messages


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Validate an already-normalised ``[{"role", "content"}]`` list (as in a task payload)."""
    if not isinstance(messages, Sequence) or not messages:
        raise InvalidInputError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in _ROLES:
            raise InvalidInputError(f"messages[{i}] needs a role in {_ROLES}")
        if not isinstance(m.get("content"), str):
            raise InvalidInputError(f"messages[{i}].content must be a string")
        out.append({"role": str(m["role"]), "content": str(m["content"])})
    return out


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    )


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[range]]:
    """The rendered conversation and the character ranges of its assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError(
            "the tokenizer has no chat template; use data.format token_ids for pre-tokenised data"
        )
    full = _render(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], True)) if i else 0
        upto = _render(tokenizer, messages[: i + 1], False)
        if not full.startswith(upto) or start > len(upto):
            raise InvalidInputError(
                "the chat template does not render a conversation's prefix as a prefix of the "
                "whole, so assistant tokens cannot be located; pre-tokenise (format token_ids)"
            )
        spans.append(range(start, len(upto)))
    return full, spans


def encode_conversation(
    tokenizer: Any, messages: list[dict[str, str]], max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 loss mask (1 on assistant tokens), truncated to ``max_length``."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(t) for t in encoded["input_ids"]][:max_length]
    mask = []
    for begin, end in encoded["offset_mapping"][: len(ids)]:
        inside = end > begin and any(begin >= s.start and end <= s.stop for s in spans)
        mask.append(1 if inside else 0)
    return ids, mask


def prompt_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The turns before the first assistant turn (the prompt the target answers when it
    regenerates); raises :class:`MalformedRecord` when there is none or no user turn among them.
    """
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    prompt = messages[:first]
    if not any(m["role"] == "user" for m in prompt):
        raise MalformedRecord("has no user turn before its first assistant turn")
    return prompt


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt_messages(messages)`` rendered up to where the assistant's turn
    starts (generation prompt included), and an all-0 loss mask; never truncated (a prompt cut
    short would lose the start of the assistant's turn).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError(
            "the tokenizer has no chat template; use data.format token_ids for pre-tokenised data"
        )
    text = _render(tokenizer, prompt_messages(messages), True)
    ids = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    return ids, [0] * len(ids)
