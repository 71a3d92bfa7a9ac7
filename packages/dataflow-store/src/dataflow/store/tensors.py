"""Validation of the tensors handed to ``put``, and the torch <-> FeatureSpec dtype mapping.

Guarantees: a tensor accepted here is a CPU, contiguous, detached ``torch.Tensor`` of a dtype in
:data:`dataflow.contracts.features.DTYPE_ITEMSIZE`, named by a safe feature name; anything else raises
:class:`~dataflow.contracts.InvalidInputError` naming the feature, before any store is touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dataflow.contracts import FeatureSpec, InvalidInputError
from dataflow.contracts.ids import validate_id

TORCH_DTYPES: Mapping[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
"""FeatureSpec dtype name -> torch dtype, for every dtype the contracts support."""

DTYPE_NAMES: Mapping[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class PreparedSample:
    """Tensors ready to write: CPU, contiguous, detached, with their specs and total bytes."""

    tensors: Mapping[str, torch.Tensor]
    specs: Mapping[str, FeatureSpec]
    nbytes: int


_CHECKED_NAMES: set[str] = set()
"""Feature names that passed :func:`validate_id` (a run uses a handful; bounded below)."""
_MAX_CHECKED_NAMES = 4096


def _check_feature_name(name: object) -> None:
    if name in _CHECKED_NAMES:
        return
    validate_id(name, "feature name")
    if len(_CHECKED_NAMES) < _MAX_CHECKED_NAMES:
        _CHECKED_NAMES.add(name)  # type: ignore[arg-type]  # validate_id proved it a str


def spec_of(name: str, tensor: torch.Tensor) -> FeatureSpec:
    """The FeatureSpec describing ``tensor`` under ``name`` (name and dtype are checked here)."""
    _check_feature_name(name)
    dtype = DTYPE_NAMES.get(tensor.dtype)
    if dtype is None:
        raise InvalidInputError(
            f"feature {name!r} has dtype {tensor.dtype}, which is not supported; "
            f"expected one of {', '.join(TORCH_DTYPES)}"
        )
    # A torch.Size is a tuple of ints >= 0: the one remaining FeatureSpec rule, met already.
    return FeatureSpec.from_validated(name, tuple(tensor.shape), dtype)


def prepare_tensors(tensors: object) -> PreparedSample:
    """Validate ``tensors`` (a non-empty mapping name -> torch.Tensor) and stage them for writing.

    Returns CPU, contiguous, detached tensors (views when the input already is, never a copy
    otherwise needed). Raises :class:`InvalidInputError` naming the first bad entry.
    """
    if not isinstance(tensors, Mapping):
        raise InvalidInputError(
            f"tensors must be a mapping of feature name -> torch.Tensor, got {type(tensors).__name__}"
        )
    if not tensors:
        raise InvalidInputError("tensors must not be empty: a sample needs at least one feature")
    staged: dict[str, torch.Tensor] = {}
    specs: dict[str, FeatureSpec] = {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise InvalidInputError(f"feature names must be str, got {name!r}")
        if not isinstance(value, torch.Tensor):
            raise InvalidInputError(
                f"feature {name!r} must be a torch.Tensor, got {type(value).__name__}"
            )
        specs[name] = spec_of(name, value)  # validates name and dtype
        if value.requires_grad or not value.is_cpu or not value.is_contiguous():
            value = value.detach().to("cpu").contiguous()
        staged[name] = value  # a CPU, contiguous tensor that needs no grad is staged as it is
    return PreparedSample(staged, specs, sum(s.nbytes for s in specs.values()))


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """A read-only byte view of a CPU contiguous tensor's storage (no copy)."""
    if tensor.numel() == 0:
        return memoryview(b"")
    flat = tensor.reshape(-1).view(torch.uint8)
    return flat.numpy().data.cast("B")


def empty_like_spec(spec: FeatureSpec) -> torch.Tensor:
    """A new uninitialised CPU tensor of ``spec``'s shape and dtype."""
    return torch.empty(spec.shape, dtype=TORCH_DTYPES[spec.dtype])


def describe(spec: FeatureSpec) -> str:
    """``bfloat16[1, 2048, 4096]`` — how errors show a spec."""
    return f"{spec.dtype}{list(spec.shape)}"


def jsonable_metadata(metadata: object) -> dict[str, Any]:
    """Check ``metadata`` is None or a str-keyed mapping; return a plain dict copy."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidInputError(
            f"metadata must be a mapping or None, got {type(metadata).__name__}"
        )
    return dict(metadata)
