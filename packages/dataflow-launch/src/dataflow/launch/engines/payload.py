"""Turning a PromptTask's payload into token ids and a loss mask."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dataflow.contracts import InvalidInputError, PromptTask
from dataflow.contracts.checks import is_int
from dataflow.launch.data.chat import check_messages, encode_conversation, encode_prompt
from dataflow.launch.data.jsonl import MalformedRecord


def _int_list(task: PromptTask, key: str, values: Any, vocab_size: int | None) -> list[int]:
    if not isinstance(values, list | tuple) or not values:
        raise InvalidInputError(f"task {task.task_id!r}: payload {key} must be a non-empty list")
    out = []
    for v in values:
        if not is_int(v) or v < 0:
            raise InvalidInputError(f"task {task.task_id!r}: payload {key} holds {v!r}")
        if vocab_size is not None and key == "input_ids" and v >= vocab_size:
            raise InvalidInputError(
                f"task {task.task_id!r}: token id {v} is outside the vocabulary ({vocab_size})"
            )
        out.append(v)
    return out


def encode_payload(
    task: PromptTask, tokenizer: Any | None, vocab_size: int | None, *, prompt_only: bool = False
) -> tuple[list[int], list[int]]:
    """``(input_ids, loss_mask)`` of a task, truncated to ``task.max_length``.

    Payload ``{"input_ids", "loss_mask"?}`` (mask defaults to all ones) or ``{"messages"}``
    (rendered with ``tokenizer``'s chat template; the mask covers assistant tokens). Raises
    :class:`InvalidInputError` naming the task when the payload is unusable.

    ``prompt_only`` (the engine regenerates): the payload is the prompt the target answers; a
    ``messages`` payload is cut before its first assistant turn and rendered up to where the
    assistant's turn starts. Never truncated: a prompt with no room left under
    ``task.max_length`` for a generated token is refused.
    """
    payload: Mapping[str, Any] = task.payload
    if "input_ids" in payload:
        ids = _int_list(task, "input_ids", payload["input_ids"], vocab_size)
        mask = (
            _int_list(task, "loss_mask", payload["loss_mask"], None)
            if "loss_mask" in payload
            else [1] * len(ids)
        )
        if len(mask) != len(ids) or any(m not in (0, 1) for m in mask):
            raise InvalidInputError(
                f"task {task.task_id!r}: loss_mask must be 0/1 values, one per input id"
            )
    elif "messages" in payload:
        if tokenizer is None:
            raise InvalidInputError(
                f"task {task.task_id!r}: a messages payload needs the target's tokenizer"
            )
        try:
            messages = check_messages(payload["messages"])
            ids, mask = (
                encode_prompt(tokenizer, messages)
                if prompt_only
                else encode_conversation(tokenizer, messages, task.max_length)
            )
        except (InvalidInputError, MalformedRecord) as exc:
            raise InvalidInputError(f"task {task.task_id!r}: {exc}") from None
    else:
        raise InvalidInputError(
            f"task {task.task_id!r}: payload needs 'input_ids' or 'messages', got {sorted(payload)}"
        )
    if prompt_only:
        if len(ids) >= task.max_length:
            raise InvalidInputError(
                f"task {task.task_id!r}: a prompt of {len(ids)} tokens leaves no room to "
                f"generate within max_length {task.max_length}"
            )
        return ids, mask
    return ids[: task.max_length], mask[: task.max_length]
