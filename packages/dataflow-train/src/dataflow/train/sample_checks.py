"""Value checks a fetched sample passes before it is collated: what the shape and dtype checks
cannot see (issue 18: bad feature values never train).

A sample is refused when a floating feature holds NaN or inf, its ``input_ids`` are empty, it is
longer than the run's ``max_length``, or its ``loss_mask`` holds values other than 0 and 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dataflow.contracts import RunFailedError


class BadSampleError(RunFailedError):
    """More samples with bad feature values than the loader may drop (each named)."""


def sample_problem(tensors: Mapping[str, torch.Tensor], max_length: int | None) -> str | None:
    """A short reason (``bad_features: …``) why a sample must not train, or ``None``."""
    ids = tensors.get("input_ids")
    if ids is not None:
        length = int(ids.shape[-1]) if ids.dim() else int(ids.numel())
        if ids.numel() == 0 or length == 0:
            return "bad_features: empty sequence (no tokens)"
        if max_length is not None and length > max_length:
            return f"bad_features: {length} tokens, longer than max_length {max_length}"
    mask = tensors.get("loss_mask")
    if mask is not None and bool(((mask != 0) & (mask != 1)).any()):
        return "bad_features: loss_mask holds values other than 0 and 1"
    for name in sorted(tensors):
        value = tensors[name]
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"bad_features: feature {name!r} has NaN or inf values"
    return None
