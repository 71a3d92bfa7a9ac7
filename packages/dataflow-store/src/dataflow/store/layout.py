"""The byte layout of one stored sample: the safetensors format, written and read without copies.

A stored generation is ``u64 little-endian header length | JSON header | tensor bytes``, exactly
the safetensors layout, so every file or segment a store writes opens with the ``safetensors``
library too. Nothing is ever unpickled: the header is JSON, the data raw bytes.

Guarantees:
- Features are laid out largest item size first, and the header is padded with spaces so the data
  starts on a 64-byte boundary: every tensor starts aligned to its item size inside a
  page-aligned file or mapping, so it can be viewed in place (``torch.frombuffer``).
- :func:`read_header` refuses (``CorruptRecordError``) a header that is malformed, overlaps, or
  points past the bytes it describes.
- :func:`check_against` refuses (``SchemaMismatchError``) a requested feature whose stored dtype
  or shape disagrees with the ref's ``FeatureSpec``, or which is not stored at all.
"""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dataflow.contracts import CorruptRecordError, FeatureSpec, SchemaMismatchError
from dataflow.contracts.features import DTYPE_ITEMSIZE
from dataflow.store.tensors import TORCH_DTYPES, describe

ALIGN = 64
MAX_HEADER_BYTES = 16 * 1024 * 1024
_PREFIX = struct.Struct("<Q")

SAFETENSORS_DTYPES: Mapping[str, str] = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
}
_FROM_SAFETENSORS = {code: name for name, code in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """Where one feature's bytes sit, relative to the start of the whole blob."""

    spec: FeatureSpec
    start: int
    end: int


@dataclass(frozen=True)
class Layout:
    """A planned or parsed sample: header bytes, one entry per feature, total size, metadata."""

    header: bytes
    entries: Mapping[str, Entry]
    total_bytes: int
    metadata: Mapping[str, str]


def plan(specs: Iterable[FeatureSpec], metadata: Mapping[str, str] | None = None) -> Layout:
    """Lay out ``specs`` (item size descending, then name) after a 64-byte-aligned header."""
    ordered = sorted(specs, key=lambda s: (-DTYPE_ITEMSIZE[s.dtype], s.name))
    meta = dict(metadata or {})
    body: dict[str, Any] = {"__metadata__": meta} if meta else {}  # first: found in one block
    offset = 0
    for spec in ordered:
        body[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(body, separators=(",", ":")).encode()
    pad = -(_PREFIX.size + len(text)) % ALIGN
    header = _PREFIX.pack(len(text) + pad) + text + b" " * pad
    start = len(header)
    entries = {
        name: Entry(
            FeatureSpec(name, tuple(v["shape"]), _FROM_SAFETENSORS[v["dtype"]]),
            start + v["data_offsets"][0],
            start + v["data_offsets"][1],
        )
        for name, v in body.items()
        if name != "__metadata__"
    }
    return Layout(header, entries, start + offset, meta)


def read_header(blob: Any, size: int, where: str) -> Layout:
    """Parse and validate the header at the start of ``blob`` (bytes-like, ``size`` bytes long).

    ``where`` names the file or segment in errors.
    """
    if size < _PREFIX.size:
        raise CorruptRecordError(f"{where}: {size} bytes is too short for a feature header")
    (length,) = _PREFIX.unpack_from(blob, 0)
    if length > MAX_HEADER_BYTES or _PREFIX.size + length > size:
        raise CorruptRecordError(f"{where}: header length {length} does not fit in {size} bytes")
    try:
        body = json.loads(bytes(blob[_PREFIX.size : _PREFIX.size + length]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptRecordError(f"{where}: header is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise CorruptRecordError(f"{where}: header must be a JSON object")
    start = _PREFIX.size + length
    meta = body.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptRecordError(f"{where}: __metadata__ must map str -> str")
    entries = {name: _entry(name, value, start, size, where) for name, value in body.items()}
    spans = sorted((e.start, e.end, n) for n, e in entries.items())
    for (_, end_a, a), (start_b, _, b) in itertools.pairwise(spans):
        if start_b < end_a:
            raise CorruptRecordError(f"{where}: features {a!r} and {b!r} overlap")
    total = max((e.end for e in entries.values()), default=start)
    return Layout(bytes(blob[:start]), entries, total, meta)


def _entry(name: str, value: Any, start: int, size: int, where: str) -> Entry:
    try:
        dtype = _FROM_SAFETENSORS[value["dtype"]]
        spec = FeatureSpec(name, tuple(value["shape"]), dtype)
        begin, end = (int(x) for x in value["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptRecordError(f"{where}: header entry {name!r} is malformed ({exc})") from None
    if end - begin != spec.nbytes or begin < 0 or start + end > size:
        raise CorruptRecordError(
            f"{where}: feature {name!r} ({describe(spec)}) claims bytes [{begin}, {end}) "
            f"which do not match its size or lie outside the {size - start} data bytes"
        )
    return Entry(spec, start + begin, start + end)


def check_against(stored: Layout, wanted: Mapping[str, FeatureSpec], where: str) -> None:
    """Raise ``SchemaMismatchError`` unless every wanted spec equals the stored one."""
    for name, spec in wanted.items():
        entry = stored.entries.get(name)
        if entry is None:
            raise SchemaMismatchError(
                f"{where}: the ref names feature {name!r} but the stored sample has only "
                f"{sorted(stored.entries)}"
            )
        if entry.spec != spec:
            raise SchemaMismatchError(
                f"{where}: feature {name!r} is {describe(entry.spec)} in the stored bytes but the "
                f"ref says {describe(spec)}; refusing to reinterpret them"
            )


def view(blob: Any, entry: Entry) -> torch.Tensor:
    """A tensor viewing ``entry``'s bytes inside ``blob`` in place (no copy)."""
    spec = entry.spec
    dtype = TORCH_DTYPES[spec.dtype]
    if spec.numel == 0:
        return torch.empty(spec.shape, dtype=dtype)
    flat = torch.frombuffer(blob, dtype=dtype, count=spec.numel, offset=entry.start)
    return flat.view(spec.shape)
