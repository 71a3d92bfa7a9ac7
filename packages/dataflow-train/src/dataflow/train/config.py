"""TrainerConfig: the knobs of one training run, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dataflow.contracts import InvalidInputError
from dataflow.contracts.checks import is_int
from dataflow.contracts.ids import validate_id
from dataflow.train.optim import OptimConfig


@dataclass(frozen=True)
class TrainerConfig:
    """How the trainer steps, logs and checkpoints.

    ``max_steps`` stops training after that many optimizer steps (``None``: when the data ends);
    ``total_steps`` is the LR schedule's horizon (default: ``max_steps``, else the loader's
    planned batches divided by ``accumulation_steps``). ``checkpoint_interval`` 0 saves only at
    the end. Fields listed in :data:`RUN_ONLY_FIELDS` may change between a run and its resume;
    every other field must match the checkpoint.
    """

    run_id: str = "run"
    accumulation_steps: int = 1
    max_steps: int | None = None
    total_steps: int | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    log_interval: int = 1
    checkpoint_interval: int = 0
    keep_last: int = 3
    progress: bool = True
    on_nonfinite: str = "fail"
    """A window with a NaN/inf loss or gradient norm: ``fail`` the run or ``skip`` the window
    (never applied either way; see ``dataflow.train.nonfinite``)."""

    def __post_init__(self) -> None:
        validate_id(self.run_id, "run id")
        from dataflow.train.nonfinite import check_policy

        check_policy(self.on_nonfinite)
        for name, low in (
            ("accumulation_steps", 1),
            ("log_interval", 1),
            ("checkpoint_interval", 0),
            ("keep_last", 0),
        ):
            value = getattr(self, name)
            if not is_int(value) or value < low:
                raise InvalidInputError(
                    f"TrainerConfig.{name} must be an int >= {low}, got {value!r}"
                )
        for name in ("max_steps", "total_steps"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise InvalidInputError(f"TrainerConfig.{name} must be None or an int >= 1")
        if not isinstance(self.optim, OptimConfig):
            raise InvalidInputError("TrainerConfig.optim must be an OptimConfig")

    def resume_contract(self) -> dict[str, Any]:
        """The fields a resumed run must share with its checkpoint (JSON-compatible)."""
        data = dataclasses.asdict(self)
        for name in RUN_ONLY_FIELDS:
            data.pop(name)
        return data


RUN_ONLY_FIELDS = (
    "max_steps",
    "log_interval",
    "checkpoint_interval",
    "keep_last",
    "progress",
    "on_nonfinite",
)
"""Fields that only steer this process (when to stop, log, save) and may change on resume."""
