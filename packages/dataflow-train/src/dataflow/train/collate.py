"""Batch checks and collation: refs that disagree are refused; samples are padded and stacked.

Every sample feature is a tensor shaped ``[1, T, ...]`` (a batch dim of one, then the sequence).
A batch pads each feature to the longest ``T`` in the batch, rounded up to a multiple of the
sequence-parallel degree, stacks along dim 0 and adds ``attention_mask`` (int64 ``[B, T]``, 1 on
real tokens). Padding is zero everywhere, so padded positions carry ``loss_mask == 0``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dataflow.contracts import FeatureSpec, SampleRef, SchemaMismatchError, TrainBatch
from dataflow.train.batch_buffers import POOL_MIN_BYTES, BatchBuffers

ATTENTION_MASK = "attention_mask"
"""Name of the mask collation adds; a sample must not carry a feature of this name."""


def check_refs_agree(refs: Sequence[SampleRef], strategy: str, schema_version: int) -> None:
    """Raise :class:`SchemaMismatchError` unless every ref fits one batch.

    Guarantees: strategy equals ``strategy``; schema version equals ``schema_version``; refs that
    carry specs share one set of feature names and, per feature, one dtype and one rank. Reads
    only the refs: nothing is fetched or leased.
    """
    if not refs:
        raise SchemaMismatchError("a batch needs at least one ref")
    for ref in refs:
        if ref.strategy != strategy:
            raise SchemaMismatchError(
                f"sample {ref.sample_id!r} has strategy {ref.strategy!r}; "
                f"this loader trains {strategy!r}"
            )
        if ref.schema_version != schema_version:
            raise SchemaMismatchError(
                f"sample {ref.sample_id!r} has feature schema version {ref.schema_version}; "
                f"this loader reads version {schema_version}"
            )
    described = [ref for ref in refs if ref.feature_specs]
    if described:
        first = described[0]
        for ref in described[1:]:
            _check_specs_agree(
                first.sample_id, first.feature_specs, ref.sample_id, ref.feature_specs
            )


def _check_specs_agree(
    first_id: str,
    first: Mapping[str, FeatureSpec],
    other_id: str,
    other: Mapping[str, FeatureSpec],
) -> None:
    if set(first) != set(other):
        raise SchemaMismatchError(
            f"samples {first_id!r} and {other_id!r} carry different features: "
            f"{sorted(first)} vs {sorted(other)}"
        )
    for name, spec in first.items():
        theirs = other[name]
        if spec.dtype != theirs.dtype:
            raise SchemaMismatchError(
                f"feature {name!r} is {spec.dtype} in {first_id!r} but {theirs.dtype} in {other_id!r}"
            )
        if len(spec.shape) != len(theirs.shape):
            raise SchemaMismatchError(
                f"feature {name!r} has rank {len(spec.shape)} in {first_id!r} "
                f"but rank {len(theirs.shape)} in {other_id!r}"
            )


def sequence_length(sample_id: str, tensors: Mapping[str, torch.Tensor]) -> int:
    """The sample's token count ``T``; every feature must be ``[1, T, ...]`` with the same ``T``."""
    if not tensors:
        raise SchemaMismatchError(f"sample {sample_id!r} has no features")
    if ATTENTION_MASK in tensors:
        raise SchemaMismatchError(
            f"sample {sample_id!r} carries {ATTENTION_MASK!r}, which collation owns"
        )
    lengths = {}
    for name, tensor in tensors.items():
        if tensor.dim() < 2 or tensor.shape[0] != 1:
            raise SchemaMismatchError(
                f"feature {name!r} of sample {sample_id!r} has shape {tuple(tensor.shape)}; "
                "expected [1, T, ...]"
            )
        lengths[name] = int(tensor.shape[1])
    if len(set(lengths.values())) != 1:
        raise SchemaMismatchError(
            f"features of sample {sample_id!r} disagree on the sequence length: {lengths}"
        )
    return next(iter(lengths.values()))


def _check_samples_agree(ids: Sequence[str], samples: Sequence[Mapping[str, torch.Tensor]]) -> None:
    first = samples[0]
    for sample_id, sample in zip(ids[1:], samples[1:], strict=True):
        if set(sample) != set(first):
            raise SchemaMismatchError(
                f"samples {ids[0]!r} and {sample_id!r} carry different features: "
                f"{sorted(first)} vs {sorted(sample)}"
            )
        for name, tensor in first.items():
            theirs = sample[name]
            if tensor.dtype != theirs.dtype or tensor.dim() != theirs.dim():
                raise SchemaMismatchError(
                    f"feature {name!r} is {tensor.dtype} rank {tensor.dim()} in {ids[0]!r} but "
                    f"{theirs.dtype} rank {theirs.dim()} in {sample_id!r}"
                )
            if tensor.shape[2:] != theirs.shape[2:]:
                raise SchemaMismatchError(
                    f"feature {name!r} has trailing shape {tuple(tensor.shape[2:])} in "
                    f"{ids[0]!r} but {tuple(theirs.shape[2:])} in {sample_id!r}"
                )


def _lengths_if_agreeing(samples: Sequence[Mapping[str, torch.Tensor]]) -> list[int] | None:
    """Each sample's ``T`` when every check of ``sequence_length`` and ``_check_samples_agree``
    passes, read in one pass (one shape and dtype read per tensor); ``None`` otherwise.
    """
    first = samples[0]
    if not first or ATTENTION_MASK in first:
        return None
    expected = {}
    first_length = -1
    for name, tensor in first.items():
        shape = tensor.shape
        if len(shape) < 2 or shape[0] != 1 or (first_length != -1 and shape[1] != first_length):
            return None
        first_length = shape[1]
        expected[name] = (tensor.dtype, shape[2:])
    lengths = [int(first_length)]
    for sample in samples[1:]:
        if sample.keys() != expected.keys():
            return None
        length = -1
        for name, tensor in sample.items():
            shape = tensor.shape
            dtype, trailing = expected[name]
            if len(shape) < 2 or shape[0] != 1 or tensor.dtype != dtype or shape[2:] != trailing:
                return None
            if length != shape[1]:
                if length != -1:
                    return None
                length = shape[1]
        lengths.append(int(length))
    return lengths


def _pooled(
    buffers: BatchBuffers | None,
    rows: int,
    target: int,
    first_length: int,
    protos: Mapping[str, torch.Tensor],
) -> list[torch.Tensor | None] | None:
    """Per feature (in ``protos`` order) a pool tensor to collate into, or ``None`` to allocate
    it fresh: no pool, a device tensor (the pool holds host memory), or a batch tensor smaller
    than :data:`~dataflow.train.batch_buffers.POOL_MIN_BYTES`. ``None`` when none is pooled.
    """
    if buffers is None:
        return None
    # Every feature is [1, T, ...]: its batch tensor holds rows * target / T times its bytes.
    scale = rows * target
    least = POOL_MIN_BYTES * max(first_length, 1)
    if max(proto.nbytes for proto in protos.values()) * scale < least:
        return None
    return [
        buffers.take((rows, target, *proto.shape[2:]), proto.dtype)
        if proto.nbytes * scale >= least and proto.is_cpu
        else None
        for proto in protos.values()
    ]


def padded_length(longest: int, multiple: int) -> int:
    """``longest`` rounded up to a multiple of ``multiple`` (the sequence-parallel degree)."""
    return -(-longest // multiple) * multiple


def collate(
    sample_ids: Sequence[str],
    samples: Sequence[Mapping[str, torch.Tensor]],
    *,
    strategy: str,
    pad_multiple: int = 1,
    metadata: Mapping[str, Any] | None = None,
    buffers: BatchBuffers | None = None,
) -> TrainBatch:
    """Stack samples into one :class:`TrainBatch`, padding the sequence dim with zeros.

    Guarantees: row ``i`` of every tensor is ``sample_ids[i]``; the padded length is the
    longest sample's, rounded up to ``pad_multiple``; ``attention_mask`` marks real tokens.
    Samples whose feature names, dtypes, ranks or trailing shapes disagree are refused with
    :class:`SchemaMismatchError`. With ``buffers`` each batch tensor of at least
    :data:`~dataflow.train.batch_buffers.POOL_MIN_BYTES` is written into one of the pool's idle
    buffers (see :mod:`dataflow.train.batch_buffers` for when one is reused).
    """
    if len(sample_ids) != len(samples) or not samples:
        raise SchemaMismatchError(
            f"collate needs one sample per id, got {len(samples)} samples for {len(sample_ids)} ids"
        )
    lengths = _lengths_if_agreeing(samples)
    if lengths is None:  # something is off: the exact checks name it
        lengths = [sequence_length(sid, s) for sid, s in zip(sample_ids, samples, strict=True)]
        _check_samples_agree(sample_ids, samples)
    target = padded_length(max(lengths), pad_multiple)
    rows = len(samples)
    protos = samples[0]
    same_length = all(length == target for length in lengths)
    views = _pooled(buffers, rows, target, lengths[0], protos)
    out: dict[str, torch.Tensor] = {}
    if same_length:
        # No padding anywhere: one concatenation (a copy) per feature, an all-ones mask.
        for i, name in enumerate(protos):
            parts = [sample[name] for sample in samples]
            into = None if views is None else views[i]
            out[name] = torch.cat(parts) if into is None else torch.cat(parts, out=into)
        out[ATTENTION_MASK] = torch.ones((rows, target), dtype=torch.int64)
    else:
        for i, (name, proto) in enumerate(protos.items()):
            # Only the padding is zeroed: the rest is overwritten at once.
            into = None if views is None else views[i]
            batched = proto.new_empty((rows, target, *proto.shape[2:])) if into is None else into
            for row, (sample, length) in enumerate(zip(samples, lengths, strict=True)):
                batched[row, :length] = sample[name][0]
                if length < target:
                    batched[row, length:] = 0
            out[name] = batched
        positions = torch.arange(target).unsqueeze(0)
        out[ATTENTION_MASK] = (positions < torch.tensor(lengths).unsqueeze(1)).to(torch.int64)
    meta = dict(metadata or {})
    meta["sequence_lengths"] = tuple(lengths)
    return TrainBatch(sample_ids=tuple(sample_ids), strategy=strategy, tensors=out, metadata=meta)
