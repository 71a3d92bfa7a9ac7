"""Headerless feature objects a capture server wrote into Mooncake itself (no copy through us).

SpecForge's server-capture protocol (sgl-project/SpecForge at commit a6b6b023:
``specforge/inference/adapters/server_capture.py`` and the SGLang v0.5.14 patch
``patches/sglang/v0.5.14/spec-capture.patch``, file ``python/sglang/srt/spec_capture_sink.py``,
``SpecCaptureSink._tkey`` / ``put_samples``) has a patched SGLang server write every captured
tensor as ONE hard-pinned object (``replica_num = 1``, ``with_hard_pin = True``) at key
``{store_id}/{sample_id}/g{gen}/{name}`` holding the tensor's raw bytes only — C-contiguous,
no header; its shape and dtype travel back in the ``/generate`` response
(``meta_info["spec_capture"]["features"][name] = {"shape", "dtype"}``).

With ``store_id`` set to :data:`~dataflow.store.mooncake_wire.PREFIX` those keys are exactly the
feature keys of the ``mooncake://`` store (:mod:`dataflow.store.mooncake_wire`), so the store
adopts them as a generation of its own (``MooncakeFeatureStore.adopt_external``): it checks each
object, writes the small manifest (marking the generation :data:`RAW`) and hands out a ref whose
``metadata[LAYOUT_KEY]`` says the objects are headerless. Every lifetime rule (leases,
consume-once, abort, gc, stale generations) then applies unchanged.

Guarantees of this module: :func:`check_sizes` refuses a missing object (``NotFoundError``) and
an object whose size is not ``numel * itemsize`` of its spec (``SchemaMismatchError``), naming
the key, before anything is adopted; :func:`layout_of` refuses a ref whose layout marker is
neither absent nor :data:`RAW`.
"""

from __future__ import annotations

from collections.abc import Sequence

from dataflow.contracts import (
    FeatureSpec,
    InvalidInputError,
    NotFoundError,
    SampleRef,
    SchemaMismatchError,
)
from dataflow.contracts.features import DTYPE_ITEMSIZE
from dataflow.store.tensors import describe

LAYOUT_KEY = "mooncake_layout"
"""Ref metadata key naming the object layout of a ``mooncake://`` generation."""

RAW = "raw"
"""Headerless objects (raw tensor bytes; shape and dtype only in the ref's specs)."""


def layout_of(ref: SampleRef) -> str:
    """``RAW`` or ``""`` (the store's own self-describing objects); anything else is refused."""
    layout = ref.metadata.get(LAYOUT_KEY, "")
    if layout not in ("", RAW):
        raise InvalidInputError(
            f"ref {ref.sample_id!r}: metadata[{LAYOUT_KEY!r}] is {layout!r}; a mooncake:// ref "
            f"is either headerless ({RAW!r}) or carries no layout marker"
        )
    return str(layout)


def check_sizes(
    keys: Sequence[str], specs: Sequence[FeatureSpec], sizes: Sequence[int], where: str
) -> None:
    """Raise unless every object exists (size >= 0) and holds exactly its spec's raw bytes."""
    for key, spec, size in zip(keys, specs, sizes, strict=True):
        if size < 0:
            raise NotFoundError(
                f"{where}/{key}: no such object; the capture server did not write feature "
                f"{spec.name!r} here (is it connected to this Mooncake master, with store_id "
                "'dataflow'?)"
            )
        expected = spec.numel * DTYPE_ITEMSIZE[spec.dtype]
        if size != expected:
            raise SchemaMismatchError(
                f"{where}/{key}: the object holds {size} bytes but feature {spec.name!r} is "
                f"{describe(spec)} = {spec.numel} x {DTYPE_ITEMSIZE[spec.dtype]} = {expected} "
                "raw bytes; refusing to adopt it"
            )
