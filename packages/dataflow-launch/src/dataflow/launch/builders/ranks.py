"""The trainer's process layout: one process, or one rank of a ``torchrun`` job."""

from __future__ import annotations

import os
from dataclasses import dataclass

from dataflow.contracts import Collective, InvalidInputError
from dataflow.launch.config import LaunchConfig
from dataflow.launch.precision import DtypeChoice, choose_dtype, trainer_device
from dataflow.train.distributed import (
    DistributedContext,
    LocalCollective,
    init_distributed,
    shutdown_distributed,
)
from dataflow.train.eagle3.sequence import SequenceExchange
from dataflow.train.parallel.backend import LocalBackend, TrainBackend
from dataflow.train.parallel.sequence import SequenceParallelMesh


@dataclass
class RankLayout:
    """The rank, world size, collective and training backend of the current process.

    With sequence parallelism (``sequence`` set) the ranks form ``dp_size`` groups of
    ``sp_size``; a group reads the same batches, so the loader is sharded by ``data_rank`` over
    ``data_world`` and pads sequences to a multiple of ``sp_size``.
    """

    rank: int
    world_size: int
    collective: Collective
    backend: TrainBackend
    context: DistributedContext | None = None
    sequence: SequenceParallelMesh | None = None

    @property
    def exchange(self) -> SequenceExchange | None:
        """The sequence-parallel exchange the objective shards over (None: whole sequences)."""
        return None if self.sequence is None else self.sequence.exchange

    @property
    def data_rank(self) -> int:
        """The data shard this rank reads (its data-parallel group)."""
        return self.rank if self.sequence is None else self.sequence.dp_rank

    @property
    def data_world(self) -> int:
        """How many data shards the job reads (data-parallel groups)."""
        return self.world_size if self.sequence is None else self.sequence.dp_size

    @property
    def sp_size(self) -> int:
        """Ranks sharing each sequence (1: no sequence parallelism)."""
        return 1 if self.sequence is None else self.sequence.sp_size

    def close(self, clean: bool) -> None:
        """Leave the job (barrier first after a clean run)."""
        if self.context is not None:
            shutdown_distributed(clean)


def trainer_bf16(config: LaunchConfig) -> DtypeChoice:
    """The trainer's precision: ``trainer.bf16`` when set, else chosen by capability."""
    bf16 = config.trainer.bf16
    if bf16 is not None:
        return DtypeChoice("bfloat16" if bf16 else "float32", "set in the config (trainer.bf16)")
    return choose_dtype("auto", trainer_device())


def in_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_layout(config: LaunchConfig) -> RankLayout:
    """One rank (``LocalBackend``) or, under ``torchrun``, FSDP2 over the job, or with
    ``trainer.sp_size > 1`` data x sequence parallelism (``SequenceParallelBackend``).

    The job's world size must equal ``trainer.dp_size * trainer.sp_size``
    (``InvalidInputError`` otherwise, before joining any process group).
    """
    precision = "bf16" if trainer_bf16(config).dtype == "bfloat16" else "fp32"
    t = config.trainer
    ranks = t.world_size
    if not in_torchrun():
        if ranks != 1:
            raise InvalidInputError(
                f"trainer.dp_size x trainer.sp_size is {t.dp_size} x {t.sp_size} = {ranks} but "
                f"this is one process; start the consumer with torchrun --nproc-per-node {ranks}"
            )
        return RankLayout(0, 1, LocalCollective(), LocalBackend(precision))
    world = int(os.environ["WORLD_SIZE"])
    if world != ranks:
        raise InvalidInputError(
            f"torchrun started {world} ranks but trainer.dp_size x trainer.sp_size is "
            f"{t.dp_size} x {t.sp_size} = {ranks}"
        )
    context = init_distributed()
    if t.sp_size > 1:
        from dataflow.train.parallel.sequence import (
            SequenceParallelBackend,
            init_sequence_parallel,
        )

        mesh = init_sequence_parallel(t.dp_size, t.sp_size)
        backend: TrainBackend = SequenceParallelBackend(mesh, precision)
        return RankLayout(
            context.rank, context.world_size, context.collective, backend, context, mesh
        )
    from dataflow.train.parallel.fsdp import FSDPBackend

    return RankLayout(
        context.rank,
        context.world_size,
        context.collective,
        FSDPBackend(context, precision),
        context,
    )
