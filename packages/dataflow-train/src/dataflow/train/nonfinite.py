"""The non-finite step guard: a window whose loss or gradient norm is NaN/inf is never applied.

Checked at each optimizer boundary after clipping and before ``optimizer.step``: the loss is
the mean over ranks and the gradient norm is global, so every rank reaches the same verdict.
``fail`` raises :class:`NonFiniteStepError` naming the step and this rank's sample ids (the run
fails, the weights keep their last finite values); ``skip`` discards the window's gradients,
warns with the same facts and goes on (the step counter still advances, so windows and acks
stay aligned).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from dataflow.contracts import InvalidInputError, RunFailedError

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("fail", "skip")
"""What the trainer does with a non-finite step (``TrainerConfig.on_nonfinite``)."""


class NonFiniteStepError(RunFailedError):
    """An optimizer window's loss or gradient norm was NaN or infinite; it was not applied."""


def check_policy(policy: object) -> str:
    """``policy`` if it is one of :data:`NONFINITE_POLICIES`, else ``InvalidInputError``."""
    if policy not in NONFINITE_POLICIES:
        raise InvalidInputError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}")
    return str(policy)


def nonfinite_problem(loss: float, grad_norm: float) -> str | None:
    """What is non-finite about a step (``None`` when both figures are finite)."""
    bad = [f"{name} {value}" for name, value in (("loss", loss), ("grad_norm", grad_norm))]
    bad = [
        text for text, value in zip(bad, (loss, grad_norm), strict=True) if not math.isfinite(value)
    ]
    return ", ".join(bad) or None


def guard_step(
    step: int, loss: float, grad_norm: float, sample_ids: Sequence[str], policy: str
) -> bool:
    """True when the step must be skipped; raises :class:`NonFiniteStepError` under ``fail``."""
    problem = nonfinite_problem(loss, grad_norm)
    if problem is None:
        return False
    shown = list(sample_ids[:20])
    more = f" (+{len(sample_ids) - 20} more)" if len(sample_ids) > 20 else ""
    text = (
        f"optimizer step {step} is non-finite ({problem}); samples of this rank's window: "
        f"{shown}{more}"
    )
    if policy == "fail":
        raise NonFiniteStepError(
            f"{text}; the update was not applied (set trainer.on_nonfinite=skip to skip such "
            "windows)"
        )
    log.warning("%s; skipped: gradients discarded, weights unchanged", text)
    return True
