"""Data x sequence parallelism: ``dp`` groups of ``sp`` ranks, each group training one batch.

Within a group the ranks hold replicated parameters and each runs the objective on its
contiguous share of every sequence (Ulysses: an all-to-all over heads around attention, see
:mod:`~dataflow.train.parallel.ulysses`). Gradients are SUM-reduced over the group (the shares
of one sequence add up to its gradient) and averaged over the groups (different samples), then
clipped by the global norm; every rank steps the same optimizer on the same gradient.

Usage, after ``torch.distributed.init_process_group`` over ``dp * sp`` ranks::

    mesh = init_sequence_parallel(dp_size=2, sp_size=2)
    objective = Eagle3Objective(config, sequence_parallel=mesh.exchange)
    loader = FeatureDataLoader(store, refs=refs, batch_size=b,
                               rank=mesh.dp_rank, world_size=mesh.dp_size, pad_multiple=mesh.sp_size)
    trainer = Trainer(SequenceParallelObjective(objective, mesh.exchange), loader, config,
                      backend=SequenceParallelBackend(mesh))

The ranks of a group read the same batches (the loader is sharded by ``dp_rank``), so only the
group's first rank reports the samples it trained (``reports_samples``): an ack over all ranks
then lists every sample once.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from dataflow.contracts import Collective, InvalidInputError
from dataflow.contracts.checks import is_int
from dataflow.train.distributed import FailTogether, TorchCollective
from dataflow.train.eagle3.objective import Eagle3Objective, StepOutput
from dataflow.train.eagle3.sequence import SequenceExchange
from dataflow.train.parallel.backend import (
    check_precision,
    local_grads,
    local_sq_norm,
    scale_grads,
)
from dataflow.train.parallel.ulysses import UlyssesExchange, shard_sequence


@dataclass(frozen=True)
class SequenceParallelMesh:
    """A rank's place in a ``dp_size x sp_size`` job and the groups it talks over."""

    dp_size: int
    sp_size: int
    dp_rank: int
    sp_rank: int
    device: torch.device
    exchange: UlyssesExchange
    control_group: dist.ProcessGroup


def init_sequence_parallel(dp_size: int, sp_size: int) -> SequenceParallelMesh:
    """Build the (dp, sp) mesh over the initialised default process group.

    Raises :class:`InvalidInputError` (before any collective) when the sizes are not positive
    integers or their product is not the world size. Ranks ``r`` with the same ``r // sp_size``
    form one sequence-parallel group.
    """
    for name, value in (("dp_size", dp_size), ("sp_size", sp_size)):
        if not is_int(value) or value < 1:
            raise InvalidInputError(f"{name} must be an int >= 1, got {value!r}")
    if not dist.is_initialized():
        raise InvalidInputError("init_sequence_parallel needs an initialised process group")
    world = dist.get_world_size()
    if dp_size * sp_size != world:
        raise InvalidInputError(
            f"dp_size x sp_size = {dp_size} x {sp_size} = {dp_size * sp_size}, but the job has "
            f"{world} ranks"
        )
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (dp_size, sp_size), mesh_dim_names=("dp", "sp"))
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if device_type == "cuda"
        else torch.device("cpu")
    )
    return SequenceParallelMesh(
        dp_size=dp_size,
        sp_size=sp_size,
        dp_rank=mesh.get_local_rank("dp"),
        sp_rank=mesh.get_local_rank("sp"),
        device=device,
        exchange=UlyssesExchange(mesh["sp"].get_group()),
        control_group=dist.new_group(backend="gloo"),
    )


class SequenceParallelObjective(nn.Module):
    """The objective on this rank's share of each sequence.

    ``forward`` takes the whole (padded) batch and shards it itself. The returned loss's VALUE
    is the whole sequence's (the group's shares summed), so every rank logs the same loss as one
    rank would, while its GRADIENT is this share's, so summing gradients over the group gives
    the whole sequence's gradient. Metrics and counts are already global over the group.
    ``exchange`` must be the one the objective was built with; a ``LocalSequence`` gives the
    same parameter names on one process (to load or export an SP run's checkpoint).
    """

    def __init__(self, objective: Eagle3Objective, exchange: SequenceExchange) -> None:
        super().__init__()
        self.objective = objective
        self.exchange = exchange

    def forward(self, tensors: Mapping[str, torch.Tensor]) -> StepOutput:
        out: StepOutput = self.objective(shard_sequence(tensors, self.exchange))
        share = out.loss
        whole = self.exchange.sum(share)
        return dataclasses.replace(out, loss=share + (whole - share).detach())


class SequenceParallelBackend:
    """A :class:`~dataflow.train.parallel.backend.TrainBackend` for ``dp x sp`` ranks holding
    replicated parameters (see the module docstring for the reduction).

    ``data_parallel_size`` is ``dp_size`` (ranks training distinct samples) and
    ``reports_samples`` is true on the first rank of each sequence-parallel group only.
    """

    def __init__(self, mesh: SequenceParallelMesh, precision: str = "fp32") -> None:
        self.mesh = mesh
        self._precision = check_precision(precision)
        self._fail = FailTogether(mesh.control_group)
        self._collective = TorchCollective(mesh.control_group)

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def data_parallel_size(self) -> int:
        return self.mesh.dp_size

    @property
    def reports_samples(self) -> bool:
        return self.mesh.sp_rank == 0

    @property
    def device(self) -> torch.device:
        return self.mesh.device

    @property
    def collective(self) -> Collective:
        return self._collective

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.mesh.device)

    def autocast(self) -> AbstractContextManager[None]:
        if self._precision == "bf16":
            return torch.autocast(self.mesh.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def set_gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        return None  # gradients are reduced once, at the boundary, in clip_grad_norm

    def clip_grad_norm(self, params: Iterable[nn.Parameter], max_norm: float | None) -> float:
        grads = local_grads(params)
        if grads:  # one collective for all gradients, not one per parameter
            flat = torch.cat([g.reshape(-1) for g in grads])
            # SUM over every rank = SUM over sp within each group, summed over the dp groups
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.mesh.dp_size)
            for grad, reduced in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                grad.copy_(reduced.view_as(grad))
        total = float(local_sq_norm(grads).sqrt())
        scale_grads(grads, total, max_norm)
        return total

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        out = values.detach().to(torch.float64).cpu().clone()  # over gloo, on any device
        dist.all_reduce(out, group=self.mesh.control_group)
        return out / self.world_size

    def agree(self, stage: str, error: BaseException | None, end: bool = False) -> bool:
        return self._fail.agree(stage, error, end)

    def abort(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
