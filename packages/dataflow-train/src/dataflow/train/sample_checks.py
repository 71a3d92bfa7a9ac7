"""Value checks a fetched sample passes before it is collated: what the shape and dtype checks
cannot see (issue 18: bad feature values never train).

A sample is refused when a floating feature holds NaN or inf, its ``input_ids`` are empty, it is
longer than the run's ``max_length``, or its ``loss_mask`` holds values other than 0 and 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from dataflow.contracts import RunFailedError


class BadSampleError(RunFailedError):
    """More samples with bad feature values than the loader may drop (each named)."""


def sample_problem(tensors: Mapping[str, torch.Tensor], max_length: int | None) -> str | None:
    """A short reason (``bad_features: …``) why a sample must not train, or ``None``."""
    problem = length_problem(tensors, max_length)
    if problem is not None:
        return problem
    mask = tensors.get("loss_mask")
    if mask is not None and bool(((mask != 0) & (mask != 1)).any()):
        return "bad_features: loss_mask holds values other than 0 and 1"
    for name in sorted(tensors):
        value = tensors[name]
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"bad_features: feature {name!r} has NaN or inf values"
    return None


def length_problem(tensors: Mapping[str, torch.Tensor], max_length: int | None) -> str | None:
    """The checks of :func:`sample_problem` that read only shapes (no tensor value is read)."""
    ids = tensors.get("input_ids")
    if ids is not None:
        shape = ids.shape
        if not shape:  # a 0-d tensor: one token
            length = 1
        else:
            length = int(shape[-1])
            if 0 in shape:
                return "bad_features: empty sequence (no tokens)"
        if max_length is not None and length > max_length:
            return f"bad_features: {length} tokens, longer than max_length {max_length}"
    return None


_WIDE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
_INTEGER = frozenset((torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64))


def values_surely_fine(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether no floating tensor holds NaN/inf and ``loss_mask`` holds only 0 and 1, read with
    one reduction per tensor (a batch checks all its samples at once).

    ``True`` is certain: a NaN or inf element makes a sum NaN or inf, and integer bounds 0..1
    admit only 0 and 1. ``False`` may be a false alarm (a finite sum that overflowed), so the
    caller then asks :func:`sample_problem` of each sample for the exact answer.
    """
    mask = tensors.get("loss_mask")
    if mask is not None and mask.dtype in _INTEGER and mask.numel():
        low, high = torch.aminmax(mask)
        if int(low) < 0 or int(high) > 1:
            return False
    elif mask is not None and mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        return False
    for value in tensors.values():
        dtype = value.dtype
        if dtype.is_floating_point:  # an empty tensor sums to 0: finite
            wide = _WIDE.get(dtype)
            total = value.sum() if wide is None else value.sum(dtype=wide)
            if not math.isfinite(total.item()):
                return False
    return True
