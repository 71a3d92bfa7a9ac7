"""Text forms of the records a durable ledger stores (the contracts' JSON wire format).

``SampleRef`` is on the hot path (every commit writes one, every dispatch reads one), so it has
a direct encoder and decoder producing and accepting exactly what ``dataflow.contracts.codec``
does; anything unusual (another schema version, unknown fields) goes through the strict codec.
Stored text that does not decode is a ``CorruptRecordError``: the ledger wrote it validated.

A backend that stores ``ref_crc(text)`` beside the text at commit reads it back with
``decode_checked_ref``: text whose CRC-32 still matches is exactly what this ledger encoded from a
ref it had validated, so the ref is rebuilt with ``SampleRef.from_validated`` (kind, version,
fields and sample id still checked); a CRC mismatch is a ``CorruptRecordError``. The CRC guards
against damage (a torn page, a garbled or hand-edited row), not against a writer who recomputes
it: whoever can write the ledger file is trusted with it anyway.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any, TypeVar

from dataflow.contracts import FrozenDict
from dataflow.contracts.codec import SCHEMA_VERSIONS, dumps, loads
from dataflow.contracts.errors import CorruptRecordError, DataflowError
from dataflow.contracts.features import FeatureSpec, SampleRef

try:
    import orjson
except ImportError:  # pragma: no cover - a declared dependency; the stdlib gives equal texts
    orjson = None  # type: ignore[assignment]

R = TypeVar("R")

REF_VERSION = SCHEMA_VERSIONS["SampleRef"]
_SPEC_VERSION = SCHEMA_VERSIONS["FeatureSpec"]
_REF_FIELDS = frozenset(
    {
        "kind",
        "v",
        "sample_id",
        "store_uri",
        "feature_keys",
        "feature_specs",
        "generation",
        "source_task_id",
        "run_id",
        "strategy",
        "schema_version",
        "estimated_bytes",
        "num_tokens",
        "target_version",
        "draft_weight_version",
        "metadata",
    }
)


SCALARS = frozenset({str, int, float, bool, type(None)})
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def thaw(value: Any) -> Any:
    """A frozen JSON value as json takes it (tuples to lists, mappings to dicts)."""
    kind = type(value)
    if kind in SCALARS:
        return value
    if kind is tuple:
        return [thaw(child) for child in value]
    if isinstance(value, Mapping):
        return {key: thaw(child) for key, child in value.items()}
    return value


def encode_json(data: Any) -> str:
    """Compact JSON text of plain values (no NaN: validated records hold none)."""
    # orjson writes the same JSON values several times faster (UTF-8 where json escapes to
    # ASCII); what it refuses (an int beyond 64 bits) goes through json, which takes it.
    if orjson is not None:
        try:
            return orjson.dumps(data).decode()
        except TypeError:  # orjson.JSONEncodeError
            pass
    return _ENCODER.encode(data)


def encode_ref(ref: SampleRef) -> str:
    """The codec's JSON text of ``ref`` (same fields and values), built directly."""
    return encode_json(
        {
            "kind": "SampleRef",
            "v": REF_VERSION,
            "sample_id": ref.sample_id,
            "store_uri": ref.store_uri,
            # SampleRef froze these to FrozenDicts, tuples and scalars: json takes them as they are.
            "feature_keys": keys if type(keys := ref.feature_keys) is FrozenDict else dict(keys),
            "feature_specs": {
                name: {"name": s.name, "shape": s.shape, "dtype": s.dtype}  # tuple: a JSON array
                for name, s in ref.feature_specs.items()
            },
            "generation": ref.generation,
            "source_task_id": ref.source_task_id,
            "run_id": ref.run_id,
            "strategy": ref.strategy,
            "schema_version": ref.schema_version,
            "estimated_bytes": ref.estimated_bytes,
            "num_tokens": ref.num_tokens,
            "target_version": ref.target_version,
            "draft_weight_version": ref.draft_weight_version,
            "metadata": meta if type(meta := ref.metadata) is FrozenDict else thaw(meta),
        }
    )


_SPEC_FIELDS = frozenset({"name", "shape", "dtype", "kind", "v"})
_SPEC_MEMO: dict[tuple[Any, ...], FeatureSpec] = {}
_SPEC_MEMO_LIMIT = 16_384


def _spec(name: str, body: Any) -> FeatureSpec:
    """The FeatureSpec of one stored spec object.

    Built and validated once per distinct (name, shape, dtype): a FeatureSpec is frozen, so every
    ref that describes the same tensor shares one instance (dispatch decodes thousands of refs
    whose specs repeat). The memo is bounded; past the bound specs are built as they come.
    """
    if type(body) is not dict or not _SPEC_FIELDS.issuperset(body):
        raise TypeError(f"feature_specs[{name!r}] is not a FeatureSpec object")
    shape = body["shape"]
    if type(shape) is not list or not all(type(dim) is int for dim in shape):
        # Not a plain int shape (True == 1 as a key): FeatureSpec validates it, unshared.
        return FeatureSpec(body["name"], tuple(shape), body["dtype"])
    key = (body["name"], body["dtype"], *shape)
    spec = _SPEC_MEMO.get(key)
    if spec is None:
        spec = FeatureSpec(body["name"], tuple(shape), body["dtype"])
        if len(_SPEC_MEMO) < _SPEC_MEMO_LIMIT:
            _SPEC_MEMO[key] = spec
    return spec


def decode_ref(text: str, where: str) -> SampleRef:
    """Rebuild a stored ref; ``where`` names the row in the error if it does not decode."""
    try:
        data = json.loads(text)
        if type(data) is dict and data.get("v") == REF_VERSION and set(data) == _REF_FIELDS:
            specs = data["feature_specs"]
            if type(specs) is not dict:
                raise TypeError("feature_specs is not an object")
            data["feature_specs"] = {name: _spec(name, body) for name, body in specs.items()}
            del data["kind"], data["v"]
            return SampleRef(**data)
        return loads(text, SampleRef)
    except (DataflowError, ValueError, TypeError, KeyError) as exc:
        raise CorruptRecordError(f"{where}: stored ref does not decode ({exc})") from None


def encode_record(record: Any) -> str:
    """The codec's JSON text of any other record (tasks, weight versions)."""
    return dumps(record)


def decode_record(text: str, kind: type[R], where: str) -> R:
    """Rebuild a stored record of ``kind``; ``CorruptRecordError`` naming ``where`` if bad."""
    try:
        return loads(text, kind)
    except DataflowError as exc:
        raise CorruptRecordError(f"{where}: stored record does not decode ({exc})") from None


_STDLIB_DECODE = json.JSONDecoder().decode


def decode_json(text: str) -> Any:
    """``json.loads`` of text this ledger wrote, through orjson where it takes it (it refuses
    ints beyond 64 bits, which json reads).
    """
    if orjson is not None:
        try:
            return orjson.loads(text)
        except ValueError:  # orjson.JSONDecodeError
            pass
    return _STDLIB_DECODE(text)


def ref_crc(text: str) -> int:
    """The CRC-32 stored beside a ref's text at commit (``decode_checked_ref`` verifies it)."""
    return zlib.crc32(text.encode())


def freeze_parsed(value: Any) -> Any:
    """A parsed JSON value deep-frozen as ``freeze_json`` would (objects to FrozenDicts, arrays
    to tuples), for values parsed from verified text: nothing to validate.
    """
    kind = type(value)
    if kind is dict:
        return FrozenDict({key: freeze_parsed(child) for key, child in value.items()})
    if kind is list:
        return tuple(freeze_parsed(child) for child in value)
    return value


def checked_spec(name: str, shape: Any, dtype: str) -> FeatureSpec:
    """The FeatureSpec of values read from verified text (shared as ``_spec`` shares them)."""
    key = (name, dtype, *shape)
    spec = _SPEC_MEMO.get(key)
    if spec is None:
        spec = FeatureSpec.from_validated(name, tuple(shape), dtype)
        if len(_SPEC_MEMO) < _SPEC_MEMO_LIMIT:
            _SPEC_MEMO[key] = spec
    return spec


def decode_checked_ref(text: str, crc: int | None, sample_id: str, where: str) -> SampleRef:
    """Rebuild the ref of row ``sample_id`` from its text and the CRC stored at commit.

    ``crc`` None (a row written before CRCs were kept) decodes with full validation. A CRC that
    does not match, text that is not this ledger's current SampleRef encoding, or a ref of
    another id is a ``CorruptRecordError`` naming ``where``.
    """
    if crc is None:
        ref = decode_ref(text, where)
    else:
        if zlib.crc32(text.encode()) != crc:
            raise CorruptRecordError(
                f"{where}: stored ref fails its checksum (the text changed after commit)"
            )
        try:
            data = decode_json(text)
            if not (
                type(data) is dict
                and data.get("kind") == "SampleRef"
                and data.get("v") == REF_VERSION
                and data.keys() == _REF_FIELDS
            ):
                raise ValueError("not this ledger's SampleRef encoding")
            del data["kind"], data["v"]
            data["feature_keys"] = FrozenDict(data["feature_keys"])
            data["feature_specs"] = FrozenDict(
                {
                    name: checked_spec(body["name"], body["shape"], body["dtype"])
                    for name, body in data["feature_specs"].items()
                }
            )
            metadata = data["metadata"]
            flat = all(type(value) in SCALARS for value in metadata.values())
            data["metadata"] = FrozenDict(metadata) if flat else freeze_parsed(metadata)
            ref = SampleRef.from_validated(**data)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CorruptRecordError(f"{where}: stored ref does not decode ({exc})") from None
    if ref.sample_id != sample_id:
        raise CorruptRecordError(f"{where}: stored ref is of sample {ref.sample_id!r}")
    return ref


def seal_ref(text: str) -> str:
    """A ref's text prefixed with its CRC-32 in 8 hex digits, for a backend that stores one
    string per ref (Redis); ``open_sealed_ref`` reads it back.
    """
    return f"{zlib.crc32(text.encode()):08x}{text}"


def open_sealed_ref(value: str, sample_id: str, where: str) -> SampleRef:
    """The ref of row ``sample_id`` from a ``seal_ref`` value, verified as by
    ``decode_checked_ref``; a bare text (``{`` first, written before CRCs were kept) decodes
    with full validation.
    """
    if value[:1] == "{":
        return decode_checked_ref(value, None, sample_id, where)
    head = value[:8]
    if len(head) != 8 or not all(c in "0123456789abcdef" for c in head):
        raise CorruptRecordError(f"{where}: stored ref has no checksum ({value!r:.40})")
    return decode_checked_ref(value[8:], int(head, 16), sample_id, where)
