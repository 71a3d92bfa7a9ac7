"""How the objective sees the sequence: whole on this process, or sharded across an SP group.

The EAGLE3 objective works on a *local* chunk of every sequence (``[B, L, ...]``). Attention is
the only place that mixes positions; the TTT shifts only look *ahead* by at most ``ttt_length``
positions. A :class:`SequenceExchange` supplies exactly those two things, so the objective has one
code path for one process and for Ulysses sequence parallelism
(:class:`dataflow.train.parallel.ulysses.UlyssesExchange`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class SequenceExchange(Protocol):
    """The cross-position services the EAGLE3 objective needs.

    ``world`` processes each hold ``L`` consecutive positions of every sequence, process ``rank``
    holding positions ``[rank * L, (rank + 1) * L)``.
    """

    @property
    def world(self) -> int: ...

    @property
    def rank(self) -> int: ...

    def heads_from_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, h, D]`` (local positions, all heads) → ``[B, world*L, h/world, D]``; autograd."""
        ...

    def sequence_from_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`heads_from_sequence`; autograd."""
        ...

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, ...]`` → ``[B, world*L, ...]`` for inputs that need no gradient."""
        ...

    def halo(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """The ``width`` positions after this chunk (``[B, width, ...]``), zeros past the end."""
        ...

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the group (no gradient); every process gets the same value."""
        ...


class LocalSequence:
    """The whole sequence on this process: every exchange is the identity or zero-fill."""

    world = 1
    rank = 0

    def heads_from_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def sequence_from_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def halo(self, x: torch.Tensor, width: int) -> torch.Tensor:
        return x.new_zeros((x.shape[0], width, *x.shape[2:]))

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()
