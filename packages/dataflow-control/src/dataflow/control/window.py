"""WindowShape: how one optimizer window is cut across data-parallel ranks."""

from __future__ import annotations

from dataclasses import dataclass

from dataflow.control._validate import positive_int


@dataclass(frozen=True)
class WindowShape:
    """``dp_size`` ranks, each taking ``batch_size x accumulation_steps`` samples per window.

    Guarantees: every field is an int ≥ 1; ``quantum`` = dp_size x per_rank is the number of
    samples one optimizer step consumes across all ranks (fixed for a run; on resume a
    different dp_size must keep it, e.g. 2 x 4 → 4 x 2).
    """

    dp_size: int
    batch_size: int
    accumulation_steps: int = 1

    def __post_init__(self) -> None:
        positive_int("WindowShape", "dp_size", self.dp_size)
        positive_int("WindowShape", "batch_size", self.batch_size)
        positive_int("WindowShape", "accumulation_steps", self.accumulation_steps)

    @property
    def per_rank(self) -> int:
        """Samples each rank trains per optimizer window."""
        return self.batch_size * self.accumulation_steps

    @property
    def quantum(self) -> int:
        """Samples per optimizer window over all ranks."""
        return self.dp_size * self.per_rank
