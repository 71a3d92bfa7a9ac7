"""Elastic resume: whether a checkpoint loads at this number of ranks, and how.

A checkpoint written by N data-parallel ranks resumes at M ranks when the global batch (the
run's quantum: data-parallel ranks x batch size x accumulation steps) stays the same, so every
optimizer step still consumes the same samples: the per-rank share ``quantum / M`` must be a
whole number of batches, and ``accumulation_steps`` the one that makes it. DCP reshards the
model and optimizer (every tensor is stored as chunks of its global shape); the per-rank
pieces (loader position, RNG) are not loaded but derived from the step, which is the ledger's
resume point: at a boundary every rank has yielded ``step x accumulation_steps`` batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataflow.contracts import InvalidInputError
from dataflow.train.checkpoint import config_differences

__all__ = ["Resharding", "resume_plan", "valid_data_parallel_sizes"]

# Contract fields that change with the number of ranks; the global batch is checked instead.
_ELASTIC_FIELDS = ("trainer.accumulation_steps", "global_batch")


@dataclass(frozen=True)
class Resharding:
    """A resume on another number of ranks than the checkpoint's."""

    saved: Mapping[str, int]
    now: Mapping[str, int]
    global_batch: int

    def describe(self, step: int) -> str:
        return (
            f"elastic resume at step {step}: checkpoint written by "
            f"{self.saved.get('data_parallel_size')} data-parallel rank(s), resumed on "
            f"{self.now['data_parallel_size']} with the same global batch of "
            f"{self.global_batch} samples; model and optimizer resharded, loader positions "
            "and RNG derived from the step"
        )


def valid_data_parallel_sizes(global_batch: int, batch_size: int) -> list[int]:
    """The data-parallel sizes that split ``global_batch`` into whole batches of
    ``batch_size`` per rank.
    """
    if batch_size < 1 or global_batch % batch_size:
        return []
    batches = global_batch // batch_size
    return [d for d in range(1, batches + 1) if batches % d == 0]


def resume_plan(
    path: Path,
    shared: Mapping[str, Any],
    contract: Mapping[str, Any],
    ranks: Mapping[str, int],
    *,
    batch_size: int,
) -> Resharding | None:
    """``None`` when ``ranks`` are the checkpoint's (restore every piece as saved), a
    :class:`Resharding` when only the number of ranks differs and the global batch is kept.

    Raises :class:`InvalidInputError` (nothing loaded) naming every differing config field;
    on another number of ranks, a new data-parallel size that does not divide the saved global
    batch into whole batches of ``batch_size``, or one that does but with another
    ``accumulation_steps``, is refused saying which sizes and which accumulation would fit.
    """
    saved_config = shared.get("config", {})
    saved_ranks = shared.get("ranks")
    same = saved_ranks == dict(ranks)
    diffs = config_differences(saved_config, contract)
    if not same:
        diffs = [d for d in diffs if d.split(":", 1)[0] not in _ELASTIC_FIELDS]
        _check_global_batch(path, saved_config, saved_ranks, contract, ranks, batch_size)
    if diffs:
        raise InvalidInputError(
            f"checkpoint {path} was written under a different config; "
            "differing fields: " + "; ".join(diffs)
        )
    if same:
        return None
    return Resharding(dict(saved_ranks or {}), dict(ranks), int(saved_config["global_batch"]))


def _check_global_batch(
    path: Path,
    saved_config: Mapping[str, Any],
    saved_ranks: Any,
    contract: Mapping[str, Any],
    ranks: Mapping[str, int],
    batch_size: int,
) -> None:
    saved_q = saved_config.get("global_batch")
    if not isinstance(saved_q, int) or not isinstance(saved_ranks, Mapping):
        raise InvalidInputError(
            f"checkpoint {path} does not record its global batch and ranks, so it cannot be "
            f"resumed on another number of ranks ({ranks['data_parallel_size']} now)"
        )
    dp_then, dp_now = saved_ranks.get("data_parallel_size"), ranks["data_parallel_size"]
    where = (
        f"checkpoint {path} was written by {dp_then} data-parallel rank(s) with a global batch "
        f"of {saved_q} samples per optimizer step"
    )
    if saved_q % (dp_now * batch_size):
        sizes = ", ".join(map(str, valid_data_parallel_sizes(saved_q, batch_size))) or "none"
        raise InvalidInputError(
            f"{where}; data-parallel size {dp_now} does not divide it into whole batches of "
            f"{batch_size} per rank, so the same samples could not make each step: resume on "
            f"a data-parallel size that divides it (with batch_size {batch_size}: {sizes})"
        )
    if contract.get("global_batch") != saved_q:
        need = saved_q // (dp_now * batch_size)
        raise InvalidInputError(
            f"{where}; on {dp_now} data-parallel rank(s) with batch_size {batch_size} the "
            f"global batch is {contract.get('global_batch')}: set accumulation_steps to {need} "
            "to keep it"
        )
