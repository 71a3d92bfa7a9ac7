"""What the ``mooncake://`` store writes into Mooncake: keys and self-describing objects.

Per stored generation of a sample:

- one object per feature, key ``dataflow/<sample id>/g<generation>/<name>``: a one-tensor
  safetensors blob (JSON header naming dtype, shape, sample id and generation, padded to 64
  bytes, then the raw tensor bytes). Written from the tensor's own memory and read into a fresh
  tensor's memory; the header travels in a separate small buffer of the same call;
- one manifest, key ``dataflow/<sample id>/g<generation>``: JSON listing the feature names. It is
  what "does this generation still exist" asks (Mooncake grants a read lease on whatever it is
  asked about; probing the manifest keeps feature objects free of leases).

The generation is in every key and is never reused (see ``MooncakeFeatureStore``), so a key is
written once: Mooncake keeps the old bytes when a put hits an existing key, and this layout never
relies on overwriting. A read is checked against the ref's spec and identity through the header,
so a ref that disagrees with the stored bytes is refused, never reinterpreted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from dataflow.contracts import CorruptRecordError, FeatureSpec
from dataflow.store.layout import check_against, plan, read_header

PREFIX = "dataflow"


def manifest_key(sample_id: str, generation: int) -> str:
    """Key of one generation's manifest."""
    return f"{PREFIX}/{sample_id}/g{generation}"


def feature_key(sample_id: str, generation: int, name: str) -> str:
    """Key of one feature of one generation."""
    return f"{manifest_key(sample_id, generation)}/{name}"


def sample_pattern(sample_id: str) -> str:
    """An ECMAScript regex matching every key of every generation of ``sample_id``.

    Characters other than letters, digits and ``_`` are put in brackets (sample ids are
    validated, so brackets, backslashes and carets never occur), which is literal in every regex dialect.
    """
    escaped = "".join(c if c.isalnum() or c == "_" else f"[{c}]" for c in sample_id)
    return f"^{PREFIX}/{escaped}/g[0-9]+(/.*)?$"


def generation_pattern(sample_id: str, generation: int) -> str:
    """An ECMAScript regex matching every feature key of one generation of ``sample_id``."""
    escaped = "".join(c if c.isalnum() or c == "_" else f"[{c}]" for c in sample_id)
    return f"^{PREFIX}/{escaped}/g{int(generation)}/.*$"


def _identity(sample_id: str, generation: int) -> dict[str, str]:
    return {"sample_id": sample_id, "generation": str(generation)}


def feature_header(sample_id: str, generation: int, spec: FeatureSpec) -> bytes:
    """The exact header bytes a feature object of ``spec`` starts with."""
    return plan([spec], _identity(sample_id, generation)).header


def manifest_bytes(
    sample_id: str, generation: int, names: Sequence[str], layout: str = ""
) -> bytes:
    """The manifest object of one generation (``layout`` set for headerless feature objects
    a capture server wrote, see :mod:`dataflow.store.mooncake_external`).
    """
    body: dict[str, object] = {**_identity(sample_id, generation), "features": sorted(names)}
    if layout:
        body["layout"] = layout
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def manifest_names(blob: bytes, where: str) -> tuple[str, ...]:
    """Feature names recorded in a manifest; ``CorruptRecordError`` if malformed."""
    try:
        names = json.loads(blob)["features"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptRecordError(f"{where}: manifest is malformed ({exc})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CorruptRecordError(f"{where}: manifest 'features' must be a list of names")
    return tuple(names)


def explain_mismatch(
    blob: bytes, size: int, sample_id: str, generation: int, spec: FeatureSpec, where: str
) -> None:
    """Raise why a stored feature object's header disagrees with what the ref expects.

    ``blob`` holds at least the stored header; ``size`` is the stored object's full size.
    ``SchemaMismatchError`` when dtype/shape differ; ``CorruptRecordError`` when the object
    belongs to another sample or generation, or its header is malformed.
    """
    stored = read_header(blob, size, where)
    check_against(stored, {spec.name: spec}, where)
    if dict(stored.metadata) != _identity(sample_id, generation):
        raise CorruptRecordError(
            f"{where}: the object belongs to {stored.metadata!r}, not sample {sample_id!r} "
            f"generation {generation}; refusing it"
        )
    raise CorruptRecordError(f"{where}: the stored header differs from the expected one")


def is_feature_key_of(key: str, sample_id: str) -> bool:
    """Whether ``key`` is a feature or manifest key of ``sample_id`` (any generation)."""
    return re.fullmatch(sample_pattern(sample_id), key) is not None
