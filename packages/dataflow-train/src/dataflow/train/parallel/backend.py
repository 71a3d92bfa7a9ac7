"""The one interface the trainer runs on, and its single-process implementation.

The trainer calls the same methods whatever the topology; a backend decides how a model is
wrapped, how precision is handled and how numbers are combined across ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Literal, Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dataflow.contracts import Collective, InvalidInputError
from dataflow.train.distributed import FailTogether, LocalCollective

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")


class TrainBackend(Protocol):
    """How one rank's model is placed, run in mixed precision and reduced over its peers.

    Guarantees every implementation keeps: parameters the optimizer sees stay fp32 (the master
    weights) whatever ``precision`` computes in; ``clip_grad_norm`` returns the global pre-clip
    L2 norm over all ranks' gradient shards; ``agree`` raises on every rank if any rank failed.
    ``data_parallel_size`` counts the ranks that train distinct samples, and ``reports_samples``
    is false on a rank whose samples a peer already reports (a sequence-parallel peer reads the
    same batches), so the ids all ranks report name each trained sample once.
    """

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def data_parallel_size(self) -> int: ...

    @property
    def reports_samples(self) -> bool: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def collective(self) -> Collective: ...

    def prepare(self, model: nn.Module) -> nn.Module: ...

    def autocast(self) -> AbstractContextManager[None]: ...

    def set_gradient_sync(self, model: nn.Module, enabled: bool) -> None: ...

    def clip_grad_norm(self, params: Iterable[nn.Parameter], max_norm: float | None) -> float: ...

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor: ...

    def agree(self, stage: str, error: BaseException | None, end: bool = False) -> bool: ...

    def abort(self) -> None: ...


def check_precision(precision: str) -> Precision:
    """Return ``precision`` if known, else raise :class:`InvalidInputError`."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def local_grads(params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    """Return this rank's part of every existing gradient (the local shard of a sharded one)."""
    grads = []
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        grads.append(grad.to_local() if isinstance(grad, DTensor) else grad)
    return grads


def local_sq_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of ``grads`` in fp32 (a 0-d tensor)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
    return norms.square().sum()


def scale_grads(grads: list[torch.Tensor], total_norm: float, max_norm: float | None) -> None:
    """Multiply ``grads`` in place so their global norm is at most ``max_norm``."""
    if max_norm is None or not grads:
        return
    coef = min(1.0, max_norm / (total_norm + 1e-6))
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)


class LocalBackend:
    """One process, no process group: the model as it is, bf16 through autocast if asked.

    With ``precision="bf16"`` parameters stay fp32 and matmuls run in bf16 under
    ``torch.autocast``; with ``"fp32"`` nothing is cast.
    """

    def __init__(self, precision: str = "fp32", device: str | torch.device = "cpu") -> None:
        self._precision = check_precision(precision)
        self._device = torch.device(device)
        self._fail = FailTogether(None)
        self._collective = LocalCollective()

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def data_parallel_size(self) -> int:
        return 1

    @property
    def reports_samples(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def collective(self) -> Collective:
        return self._collective

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self._device)

    def autocast(self) -> AbstractContextManager[None]:
        if self._precision == "bf16":
            return torch.autocast(self._device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def set_gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        return None

    def clip_grad_norm(self, params: Iterable[nn.Parameter], max_norm: float | None) -> float:
        grads = local_grads(params)
        total = float(local_sq_norm(grads).sqrt())
        scale_grads(grads, total, max_norm)
        return total

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def agree(self, stage: str, error: BaseException | None, end: bool = False) -> bool:
        return self._fail.agree(stage, error, end)

    def abort(self) -> None:
        return None
