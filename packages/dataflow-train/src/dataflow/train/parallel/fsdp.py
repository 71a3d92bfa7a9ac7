"""FSDP2 (``fully_shard``) over all ranks: gloo on CPU, NCCL on GPU.

Parameters are sharded in fp32 (the master weights the optimizer updates); with
``precision="bf16"`` FSDP's ``MixedPrecisionPolicy`` all-gathers them as bf16 for compute and
reduce-scatters gradients in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from dataflow.contracts import Collective, InvalidInputError
from dataflow.train.distributed import DistributedContext, FailTogether, TorchCollective
from dataflow.train.parallel.backend import (
    check_precision,
    local_grads,
    local_sq_norm,
    scale_grads,
)


class FSDPBackend:
    """Data parallelism with FSDP2 over ``context.mesh``; see :class:`TrainBackend`.

    Guarantees: one sharding unit over the whole objective (the draft is one decoder layer);
    gradient sync is skipped on non-boundary micro-steps and done once at the boundary;
    ``clip_grad_norm`` all-reduces the squared shard norms so every rank clips by the same
    global norm; ``abort`` tears the process groups down so peers blocked in a collective
    fail at once instead of waiting for the timeout.
    """

    def __init__(self, context: DistributedContext, precision: str = "fp32") -> None:
        self._ctx = context
        self._precision = check_precision(precision)
        self._fail = FailTogether(context.control_group)
        self._collective = TorchCollective(context.control_group)

    @property
    def rank(self) -> int:
        return self._ctx.rank

    @property
    def world_size(self) -> int:
        return self._ctx.world_size

    @property
    def data_parallel_size(self) -> int:
        return self._ctx.world_size  # every rank trains its own samples

    @property
    def reports_samples(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return self._ctx.device

    @property
    def collective(self) -> Collective:
        return self._collective

    def prepare(self, model: nn.Module) -> nn.Module:
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self._precision == "bf16"
            else MixedPrecisionPolicy()
        )
        model.to(self._ctx.device)
        fully_shard(model, mesh=self._ctx.mesh, mp_policy=policy)
        return model

    def autocast(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def set_gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        if not isinstance(model, FSDPModule):
            raise InvalidInputError("set_gradient_sync needs a model prepared by this backend")
        model.set_requires_gradient_sync(enabled)

    def clip_grad_norm(self, params: Iterable[nn.Parameter], max_norm: float | None) -> float:
        grads = local_grads(params)
        sq = local_sq_norm(grads).to(self._ctx.device)
        dist.all_reduce(sq, group=self._ctx.mesh.get_group())
        total = float(sq.sqrt())
        scale_grads(grads, total, max_norm)
        return total

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        out = values.detach().to(self._ctx.device, torch.float64).clone()
        dist.all_reduce(out, group=self._ctx.mesh.get_group())
        return (out / self.world_size).cpu()

    def agree(self, stage: str, error: BaseException | None, end: bool = False) -> bool:
        return self._fail.agree(stage, error, end)

    def abort(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
