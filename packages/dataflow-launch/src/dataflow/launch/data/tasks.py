"""Turning a prompt set into the ledger's PromptTasks, pass by pass."""

from __future__ import annotations

import random
from collections.abc import Sequence

from dataflow.contracts import InvalidInputError, PromptTask
from dataflow.contracts.ids import validate_task_id
from dataflow.launch.data.prompts import Prompt


def task_id(run_id: str, pass_index: int, index: int) -> str:
    """``<run>-p<pass>-<index>``: stable for a given prompt file, run id and pass."""
    return validate_task_id(f"{run_id}-p{pass_index}-{index}")


def pass_order(count: int, pass_index: int, seed: int, shuffle: bool) -> list[int]:
    """The order prompts are visited in one pass: file order, or ``Random(seed + pass)``."""
    order = list(range(count))
    if shuffle:
        random.Random(seed + pass_index).shuffle(order)
    return order


def build_tasks(
    prompts: Sequence[Prompt],
    *,
    run_id: str,
    passes: int,
    max_length: int,
    seed: int = 0,
    shuffle: bool = False,
    target_version: str = "unknown",
) -> list[PromptTask]:
    """One task per prompt per pass, ids ``<run>-p<pass>-<index>`` (index = position in the
    prompt set, so it survives shuffling); each pass yields new task ids, hence new sample ids.

    Payload: ``{"input_ids": [...], "loss_mask": [...]}``; metadata: source line and pass.
    """
    if passes < 1:
        raise InvalidInputError(f"passes must be >= 1, got {passes}")
    tasks = []
    for p in range(passes):
        for index in pass_order(len(prompts), p, seed, shuffle):
            prompt = prompts[index]
            tasks.append(
                PromptTask(
                    task_id=task_id(run_id, p, index),
                    payload={
                        "input_ids": list(prompt.input_ids),
                        "loss_mask": list(prompt.loss_mask),
                    },
                    max_length=max_length,
                    target_version=target_version,
                    metadata={"line": prompt.line, "pass": p},
                )
            )
    return tasks
