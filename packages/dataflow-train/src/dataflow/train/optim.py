"""AdamW and the learning-rate schedule: linear warmup, then cosine decay.

The schedule's whole state is one integer (optimizer steps taken), so a resumed run computes the
very learning rates an uninterrupted run would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dataflow.contracts import InvalidInputError


@dataclass(frozen=True)
class OptimConfig:
    """AdamW hyper-parameters, the schedule's shape and the clipping threshold.

    ``warmup_steps`` steps ramp the rate linearly up to ``lr`` (step ``s`` uses
    ``lr * (s + 1) / warmup_steps``); the rest follow a half cosine from ``lr`` down to
    ``lr * min_lr_ratio`` at ``total_steps``. ``max_grad_norm`` ``None`` disables clipping.
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 0.5

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidInputError(f"OptimConfig.lr must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise InvalidInputError(
                f"OptimConfig.weight_decay must be >= 0, got {self.weight_decay}"
            )
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise InvalidInputError(f"OptimConfig.{name} must be in [0, 1)")
        if self.warmup_steps < 0:
            raise InvalidInputError(
                f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise InvalidInputError(
                f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise InvalidInputError(
                f"OptimConfig.max_grad_norm must be positive or None, got {self.max_grad_norm}"
            )


def build_adamw(params: Iterable[torch.nn.Parameter], config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``params`` (fp32 masters under mixed precision: params are never bf16 here)."""
    params = list(params)
    if not params:
        raise InvalidInputError("the model has no trainable parameters")
    return torch.optim.AdamW(
        params,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        weight_decay=config.weight_decay,
    )


class WarmupCosineSchedule:
    """Sets every param group's learning rate for the next optimizer step.

    Guarantees: after construction the optimizer holds the rate of step 0; each ``step()``
    (called once per optimizer step, after it) moves to the next; past ``total_steps`` the rate
    stays at the floor. ``load_state_dict`` refuses a state from a different schedule.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int
    ) -> None:
        if total_steps < 1:
            raise InvalidInputError(f"total_steps must be >= 1, got {total_steps}")
        if config.warmup_steps > total_steps:
            raise InvalidInputError(
                f"warmup_steps ({config.warmup_steps}) exceeds total_steps ({total_steps})"
            )
        self._optimizer = optimizer
        self._base_lr = config.lr
        self._warmup = config.warmup_steps
        self._total = total_steps
        self._floor = config.min_lr_ratio
        self._done = 0
        self._apply()

    def factor(self, step: int) -> float:
        """Multiplier of the base rate used by optimizer step ``step`` (0-based)."""
        if step < self._warmup:
            return (step + 1) / self._warmup
        span = self._total - self._warmup
        progress = min(1.0, (step - self._warmup) / span) if span > 0 else 1.0
        return self._floor + (1.0 - self._floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def lr(self) -> float:
        """The rate the next optimizer step will use."""
        return self._base_lr * self.factor(self._done)

    def step(self) -> None:
        self._done += 1
        self._apply()

    def _apply(self) -> None:
        lr = self.lr
        for group in self._optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps_done": self._done,
            "base_lr": self._base_lr,
            "warmup_steps": self._warmup,
            "total_steps": self._total,
            "min_lr_ratio": self._floor,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = self.state_dict()
        diffs = [
            f"{key}: saved {state.get(key)!r}, now {mine[key]!r}"
            for key in ("base_lr", "warmup_steps", "total_steps", "min_lr_ratio")
            if state.get(key) != mine[key]
        ]
        if diffs:
            raise InvalidInputError("the saved LR schedule differs: " + "; ".join(diffs))
        self._done = int(state["steps_done"])
        self._apply()
