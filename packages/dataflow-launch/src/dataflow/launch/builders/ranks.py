"""The trainer's process layout: one process, or one rank of a ``torchrun`` job."""

from __future__ import annotations

import os
from dataclasses import dataclass

from dataflow.contracts import Collective, InvalidInputError
from dataflow.launch.config import LaunchConfig
from dataflow.train.distributed import (
    DistributedContext,
    LocalCollective,
    init_distributed,
    shutdown_distributed,
)
from dataflow.train.parallel.backend import LocalBackend, TrainBackend


@dataclass
class RankLayout:
    """The rank, world size, collective and training backend of the current process."""

    rank: int
    world_size: int
    collective: Collective
    backend: TrainBackend
    context: DistributedContext | None = None

    def close(self, clean: bool) -> None:
        """Leave the job (barrier first after a clean run)."""
        if self.context is not None:
            shutdown_distributed(clean)


def in_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_layout(config: LaunchConfig) -> RankLayout:
    """One rank (``LocalBackend``) or, under ``torchrun``, FSDP2 over the job.

    The job's world size must equal ``trainer.dp_size`` (``InvalidInputError`` otherwise).
    """
    precision = "bf16" if config.trainer.bf16 else "fp32"
    if not in_torchrun():
        if config.trainer.dp_size != 1:
            raise InvalidInputError(
                f"trainer.dp_size is {config.trainer.dp_size} but this is one process; start "
                "the consumer with torchrun --nproc-per-node "
                f"{config.trainer.dp_size}"
            )
        return RankLayout(0, 1, LocalCollective(), LocalBackend(precision))
    world = int(os.environ["WORLD_SIZE"])
    if world != config.trainer.dp_size:
        raise InvalidInputError(
            f"torchrun started {world} ranks but trainer.dp_size is {config.trainer.dp_size}"
        )
    from dataflow.train.parallel.fsdp import FSDPBackend

    context = init_distributed()
    return RankLayout(
        context.rank,
        context.world_size,
        context.collective,
        FSDPBackend(context, precision),
        context,
    )
