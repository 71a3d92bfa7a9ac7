"""The target writing its own response (``producer.regenerate``) in-process: a decode loop.

Greedy when the temperature is 0 (argmax of the last logits, the same tokens as transformers'
greedy ``generate``); otherwise plain temperature sampling (no top-k / top-p) drawn from a
``torch.Generator`` of its own, seeded per task by :func:`task_seed`, so a retried task writes
the same response and no other thread's use of torch's global RNG can change it. Generation
stops after ``max_new_tokens`` tokens or at an end-of-sequence token, which is kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch


def task_seed(seed: int, task_id: str) -> int:
    """A 63-bit sampling seed fixed by the run seed and the task id (stable across processes,
    restarts and retries; different tasks draw independently).
    """
    digest = hashlib.sha256(f"{seed}\0{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokens that end a response: the model's generation config's ``eos_token_id`` (an
    int or a list) and the tokenizer's.
    """
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)


@torch.no_grad()
def generate_tokens(
    model: Any,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    eos: frozenset[int],
) -> list[int]:
    """Up to ``max_new_tokens`` tokens the causal LM ``model`` writes after ``prompt`` (greedy
    at temperature 0, else sampled with ``seed``), ending at the first EOS token (included).
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    step_ids = torch.tensor([list(prompt)], dtype=torch.int64, device=device)
    past = None
    out: list[int] = []
    while len(out) < max_new_tokens:
        result = model(input_ids=step_ids, past_key_values=past, use_cache=True)
        logits = result.logits[0, -1].float()
        if generator is None:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        out.append(token)
        if token in eos:
            break
        past = result.past_key_values
        step_ids = torch.tensor([[token]], dtype=torch.int64, device=device)
    return out
