"""The draft vocabulary: the most frequent target tokens, and the d2t / t2d maps between them.

``d2t[i]`` is the *offset* from draft id ``i`` to its target id (target id = ``i + d2t[i]``), the
convention SGLang's EAGLE3 loader reads; ``t2d[v]`` is True iff target token ``v`` is in the draft
vocabulary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import torch

from dataflow.contracts.checks import is_int
from dataflow.contracts.errors import InvalidInputError

TokenCounts = Mapping[int, int] | torch.Tensor | Iterable[int]


def _counts_tensor(source: TokenCounts, target_vocab: int) -> torch.Tensor:
    """Token frequencies as an int64 tensor of length ``target_vocab``."""
    if isinstance(source, torch.Tensor):
        if source.dim() != 1:
            raise InvalidInputError(
                f"token counts must be 1-D (a count per target id), got shape {tuple(source.shape)}"
            )
        if source.is_floating_point() or source.is_complex() or source.dtype == torch.bool:
            raise InvalidInputError(f"token counts must be integers, got dtype {source.dtype}")
        if source.numel() != target_vocab:
            raise InvalidInputError(
                f"token counts have {source.numel()} entries, expected target_vocab={target_vocab}"
            )
        if source.numel() and int(source.min()) < 0:
            raise InvalidInputError("token counts must be non-negative")
        return source.to(torch.int64).clone()
    counter: Mapping[int, int] = (
        source if isinstance(source, Mapping) else Counter(int(t) for t in source)
    )
    counts = torch.zeros(target_vocab, dtype=torch.int64)
    for token, count in counter.items():
        if not is_int(token) or not 0 <= token < target_vocab:
            raise InvalidInputError(
                f"token id {token!r} is outside the target vocabulary [0, {target_vocab})"
            )
        if not is_int(count) or count < 0:
            raise InvalidInputError(
                f"count of token {token} must be a non-negative int, got {count!r}"
            )
        counts[token] += count
    return counts


def build_vocab_map(
    token_counts: TokenCounts, target_vocab: int, draft_vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the ``draft_vocab`` most frequent target tokens and return ``(d2t, t2d)``.

    ``token_counts`` is a mapping ``token id -> count``, a length-``target_vocab`` integer tensor
    of counts, or any iterable of token ids (counted here). Guarantees: the kept set is the
    ``draft_vocab`` highest counts, ties (and unseen tokens, used to fill up when fewer distinct
    tokens were seen) broken by the smaller token id, so the result is deterministic; draft ids
    are in increasing target-id order; ``d2t`` is int64 ``[draft_vocab]`` with
    ``arange(draft_vocab) + d2t`` the kept target ids; ``t2d`` is bool ``[target_vocab]`` with
    exactly those ids True. Bad input raises :class:`InvalidInputError`.
    """
    for name, value in (("target_vocab", target_vocab), ("draft_vocab", draft_vocab)):
        if not is_int(value) or value <= 0:
            raise InvalidInputError(f"{name} must be a positive int, got {value!r}")
    if draft_vocab > target_vocab:
        raise InvalidInputError(
            f"draft_vocab ({draft_vocab}) cannot exceed target_vocab ({target_vocab})"
        )
    counts = _counts_tensor(token_counts, target_vocab)
    # Stable sort on -count keeps ascending token ids among equal counts.
    order = torch.sort(-counts, stable=True).indices
    kept = torch.sort(order[:draft_vocab]).values
    d2t = kept - torch.arange(draft_vocab, dtype=torch.int64)
    t2d = torch.zeros(target_vocab, dtype=torch.bool)
    t2d[kept] = True
    return d2t, t2d


def draft_to_target_ids(d2t: torch.Tensor) -> torch.Tensor:
    """The target token id of every draft id: ``arange(len(d2t)) + d2t``."""
    return torch.arange(d2t.numel(), device=d2t.device, dtype=torch.int64) + d2t.to(torch.int64)
