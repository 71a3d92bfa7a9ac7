"""EAGLE3 metrics as ratios of additive counts, so ranks can sum counts before dividing.

Count keys (all 0-d float64 tensors, per TTT step ``k``): ``tokens`` (real positions, the loss
denominator), ``ploss_sum_k`` (masked soft cross-entropy summed over positions), ``acc_correct_k``
/ ``acc_total_k`` (draft argmax mapped through ``d2t`` equals the teacher argmax, over
loss-masked positions), ``accept_sum_k`` / ``accept_total_k`` (expected single-token acceptance
``sum_v min(p_target, q_draft)`` over positions whose teacher argmax is in the draft vocabulary).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

COUNT_PREFIXES = ("ploss_sum", "acc_correct", "acc_total", "accept_sum", "accept_total")


def count_keys(ttt_length: int) -> tuple[str, ...]:
    """Every key :func:`metrics_from_counts` needs, in a fixed order (for packed reductions)."""
    return ("tokens", *(f"{p}_{k}" for p in COUNT_PREFIXES for k in range(ttt_length)))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, and 0 where nothing was counted (``den == 0``)."""
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def metrics_from_counts(
    counts: Mapping[str, torch.Tensor], step_weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Form the logged metrics from (possibly globally summed) counts.

    Returns 0-d float tensors: ``loss`` (``sum_k w_k * ploss_k``), ``ploss_k``, ``acc_k``,
    ``acceptance_rate_k`` for every step, the pooled ``acc``, the mean ``acceptance_rate``, and
    ``simulated_acceptance_length = sum_k prod_{j<=k} acc_j``. Ratios with nothing counted are 0.
    """
    metrics: dict[str, torch.Tensor] = {}
    tokens = counts["tokens"]
    loss = torch.zeros((), dtype=torch.float64)
    chain = torch.ones((), dtype=torch.float64)
    length = torch.zeros((), dtype=torch.float64)
    rates = []
    for k, weight in enumerate(step_weights):
        ploss = _ratio(counts[f"ploss_sum_{k}"], tokens)
        acc = _ratio(counts[f"acc_correct_{k}"], counts[f"acc_total_{k}"])
        rate = _ratio(counts[f"accept_sum_{k}"], counts[f"accept_total_{k}"])
        metrics[f"ploss_{k}"] = ploss
        metrics[f"acc_{k}"] = acc
        metrics[f"acceptance_rate_{k}"] = rate
        loss = loss + weight * ploss
        chain = chain * acc
        length = length + chain
        rates.append(rate)
    correct = sum(counts[f"acc_correct_{k}"] for k in range(len(step_weights)))
    total = sum(counts[f"acc_total_{k}"] for k in range(len(step_weights)))
    metrics["loss"] = loss
    metrics["acc"] = _ratio(torch.as_tensor(correct), torch.as_tensor(total))
    metrics["acceptance_rate"] = torch.stack(rates).mean()
    metrics["simulated_acceptance_length"] = length
    return metrics
