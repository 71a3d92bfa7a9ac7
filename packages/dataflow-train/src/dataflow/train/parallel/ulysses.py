"""Ulysses sequence parallelism: all-to-all between sequence shards and head shards.

Each process of an SP group holds ``L = T / world`` consecutive positions of every sequence.
Attention needs the whole sequence, so before it q/k/v are re-distributed from "my positions,
all heads" to "all positions, my heads" with one all-to-all, and back after it. Everything else
in the EAGLE3 draft is position-wise. The TTT shifts look ahead by up to ``ttt_length``
positions: :meth:`UlyssesExchange.halo` fetches those rows from the following shards.

Use::

    exchange = UlyssesExchange(sp_group)
    objective = Eagle3Objective(config, sequence_parallel=exchange)
    out = objective(shard_sequence(batch_tensors, exchange))   # batch padded to a multiple
    out.loss.backward()                                         # of exchange.world
    # gradients: SUM over the SP group = full-sequence gradient (see Eagle3Objective)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from dataflow.contracts.errors import InvalidInputError
from dataflow.train.eagle3.sequence import SequenceExchange


def _all_to_all(
    x: torch.Tensor, group: dist.ProcessGroup | None, scatter_dim: int, gather_dim: int
) -> torch.Tensor:
    """Split ``x`` along ``scatter_dim`` and send piece ``i`` to rank ``i``.

    What each rank sent is concatenated along ``gather_dim`` in rank order.
    """
    world = dist.get_world_size(group)
    if x.shape[scatter_dim] % world:
        raise InvalidInputError(
            f"dimension {scatter_dim} of size {x.shape[scatter_dim]} cannot be split over "
            f"{world} sequence-parallel ranks"
        )
    send = torch.stack([c.contiguous() for c in x.chunk(world, dim=scatter_dim)])
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(list(recv.unbind(0)), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """All-to-all whose backward is the opposite all-to-all."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        group: dist.ProcessGroup | None,
        scatter_dim: int,
        gather_dim: int,
    ) -> torch.Tensor:
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        back = _all_to_all(grad.contiguous(), ctx.group, ctx.gather_dim, ctx.scatter_dim)
        return back, None, None, None


def all_to_all(
    x: torch.Tensor, group: dist.ProcessGroup | None, scatter_dim: int, gather_dim: int
) -> torch.Tensor:
    """Differentiable all-to-all over ``group`` (``None`` = the default group)."""
    result = _AllToAll.apply(x, group, scatter_dim, gather_dim)
    assert isinstance(result, torch.Tensor)
    return result


class UlyssesExchange:
    """:class:`~dataflow.train.eagle3.sequence.SequenceExchange` over a torch.distributed group.

    Guarantees: ``heads_from_sequence``/``sequence_from_heads`` are exact inverses and carry
    gradients; ``gather_sequence``, ``halo`` and ``sum`` carry none (they serve inputs and
    metrics); every rank must call each method in the same order (they are collectives).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise InvalidInputError("UlyssesExchange needs an initialised torch.distributed")
        self.group = group
        self._rank = dist.get_rank(group)
        self._world = dist.get_world_size(group)

    @property
    def world(self) -> int:
        return self._world

    @property
    def rank(self) -> int:
        return self._rank

    def heads_from_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return all_to_all(x, self.group, scatter_dim=2, gather_dim=1)

    def sequence_from_heads(self, x: torch.Tensor) -> torch.Tensor:
        return all_to_all(x, self.group, scatter_dim=1, gather_dim=2)

    def _gather_chunks(self, x: torch.Tensor) -> list[torch.Tensor]:
        chunks = [torch.empty_like(x) for _ in range(self._world)]
        dist.all_gather(chunks, x.detach().contiguous(), group=self.group)
        return chunks

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._gather_chunks(x), dim=1)

    def halo(self, x: torch.Tensor, width: int) -> torch.Tensor:
        heads = self._gather_chunks(x[:, :width])
        following = heads[self._rank + 1 :]
        pad = x.new_zeros((x.shape[0], width, *x.shape[2:]))
        return torch.cat([*following, pad], dim=1)[:, :width]

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        total = x.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total


def shard_sequence(
    tensors: Mapping[str, torch.Tensor], exchange: SequenceExchange
) -> dict[str, torch.Tensor]:
    """Slice out this rank's chunk (dimension 1) of every ``[B, T, ...]`` tensor.

    ``T`` must be a multiple of the group size (the loader pads to one); otherwise
    :class:`InvalidInputError` names the feature and nothing is returned.
    """
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if value.dim() < 2 or value.shape[1] % exchange.world:
            raise InvalidInputError(
                f"feature {name!r} of shape {tuple(value.shape)}: sequence length must be a "
                f"multiple of the sequence-parallel degree {exchange.world}"
            )
        local = value.shape[1] // exchange.world
        out[name] = value[:, exchange.rank * local : (exchange.rank + 1) * local]
    return out
