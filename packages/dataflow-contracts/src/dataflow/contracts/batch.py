"""TrainBatch: the one record that carries tensors; it lives on the trainer side only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class TensorLike(Protocol):
    """What the contracts need to know of a tensor, without importing torch."""

    @property
    def shape(self) -> Any: ...

    @property
    def dtype(self) -> Any: ...


@dataclass
class TrainBatch:
    """A collated batch ready for a training step.

    ``sample_ids`` are in batch order (row i of every tensor is ``sample_ids[i]``); ``tensors``
    maps feature names to batched tensors. Deliberately mutable (the trainer moves tensors to a
    device in place) and never sent across the control plane.
    """

    sample_ids: tuple[str, ...]
    strategy: str
    tensors: Mapping[str, TensorLike]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Number of samples in the batch."""
        return len(self.sample_ids)
