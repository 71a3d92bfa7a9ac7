"""The resumable pieces of a training run, each a DCP ``Stateful``.

A checkpoint is one dict of these pieces handed to ``torch.distributed.checkpoint`` (the
torchtitan way): DCP calls ``state_dict()`` on each to save, and on load fills the pieces'
``state_dict()`` templates from disk, then calls ``load_state_dict`` with the result.

- :class:`ModelState`, :class:`OptimizerState`: FSDP2-aware (``get_model_state_dict`` /
  ``get_optimizer_state_dict``): sharded DTensor state under FSDP2, plain tensors on one rank.
  DCP stores every tensor as chunks of its global shape, so a checkpoint written at one
  data-parallel size loads at another (resharding).
- :class:`RNGState`: this process's torch/Python/NumPy generators.
- :class:`PerRank`: wraps a piece whose state belongs to one rank (RNG, loader position) under
  the key ``rank-<r>``, so every rank's state is saved beside its peers' instead of DCP keeping
  one copy of a key all ranks share.
- :class:`HookStates`: the trainer hooks' progress (identical on every rank, saved once).

Every piece's state is tensors or JSON-compatible values: DCP writes non-tensor values with
``torch.save`` and reads them back with ``torch.load(weights_only=False)`` (and its
``.metadata`` with ``pickle.load``), which is why a checkpoint is only ever loaded after its
signed manifest verified (:mod:`dataflow.train.checkpoint_manifest`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dataflow.contracts import InvalidInputError
from dataflow.train.rng import capture_rng, restore_rng

__all__ = [
    "HookStates",
    "ModelState",
    "OptimizerState",
    "PerRank",
    "RNGState",
    "StatefulPiece",
]


class StatefulPiece(Protocol):
    """What DCP needs of a piece (``torch.distributed.checkpoint.stateful.Stateful``)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class ModelState:
    """The model's parameters and buffers by FQN (sharded under FSDP2)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict)


class OptimizerState:
    """The optimizer's per-parameter state and param groups, keyed by parameter FQN, so it
    reshards with the model.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class RNGState:
    """The random generators of this process (:func:`dataflow.train.rng.capture_rng`)."""

    def state_dict(self) -> dict[str, Any]:
        return capture_rng()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore_rng(state_dict)


class PerRank:
    """``piece``'s state filed under ``rank-<rank>``: each rank saves and loads its own."""

    def __init__(self, piece: StatefulPiece, rank: int) -> None:
        self.piece = piece
        self.key = f"rank-{rank}"

    def state_dict(self) -> dict[str, Any]:
        return {self.key: self.piece.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.key not in state_dict:
            raise InvalidInputError(f"the checkpoint holds no state for {self.key}")
        self.piece.load_state_dict(state_dict[self.key])


class _HasState(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class HookStates:
    """The state of every hook that has one, by its key (``AckHook``, ``AckHook#2``, ...).

    A hook's state is its progress through the run (e.g. the acked step), the same on every
    rank, so it survives a change of the number of ranks.
    Saved as one JSON document, so a resumed run whose hooks differ (one added, one gone)
    still loads: each hook present in both gets its state back, the others keep theirs.
    """

    def __init__(self, hooks: Mapping[str, _HasState]) -> None:
        self.hooks = dict(hooks)

    def state_dict(self) -> dict[str, Any]:
        states = {key: state for key, hook in self.hooks.items() if (state := hook.state_dict())}
        return {"json": json.dumps(states, sort_keys=True)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = json.loads(state_dict["json"])
        for key, hook in self.hooks.items():
            if key in saved:
                hook.load_state_dict(saved[key])
