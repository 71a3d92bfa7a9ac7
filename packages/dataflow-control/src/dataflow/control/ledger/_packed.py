"""The SQLite ledger's stored form of a ``SampleRef`` (schema 4): a JSON array of its fields.

The codec's JSON object repeats every field name and each feature's name three times; the
array holds the values only, so a stored ref is about half the text (less to write at commit,
less to parse at dispatch). Layout, in this order::

    [v, sample_id, store_uri, {feature: key}, [[feature, [shape], dtype], ...], generation,
     source_task_id, run_id, strategy, schema_version, estimated_bytes, num_tokens,
     target_version, draft_weight_version, {metadata}]

``v`` is the contracts' SampleRef schema version (an array of another version is refused); an
object (a row written by schemas 1 to 3) goes through ``_serial``'s decoders. Reading follows
``_serial``: text whose stored CRC-32 matches is rebuilt with ``SampleRef.from_validated``;
without a CRC every field is validated by the constructor; a mismatch or a malformed array is
``CorruptRecordError``.
"""

from __future__ import annotations

import zlib
from typing import Any

from dataflow.contracts import FrozenDict
from dataflow.contracts.errors import CorruptRecordError, DataflowError
from dataflow.contracts.features import FeatureSpec, SampleRef
from dataflow.control.ledger._serial import (
    REF_VERSION,
    SCALARS,
    checked_spec,
    decode_checked_ref,
    decode_json,
    decode_ref,
    encode_json,
    freeze_parsed,
    thaw,
)

_LENGTH = 15


def pack_ref(ref: SampleRef) -> str:
    """The stored text of ``ref``: its fields as one compact JSON array (see the module)."""
    keys = ref.feature_keys
    meta = ref.metadata
    return encode_json(
        [
            REF_VERSION,
            ref.sample_id,
            ref.store_uri,
            keys if type(keys) is FrozenDict else dict(keys),
            [[s.name, s.shape, s.dtype] for s in ref.feature_specs.values()],
            ref.generation,
            ref.source_task_id,
            ref.run_id,
            ref.strategy,
            ref.schema_version,
            ref.estimated_bytes,
            ref.num_tokens,
            ref.target_version,
            ref.draft_weight_version,
            meta if type(meta) is FrozenDict else thaw(meta),
        ]
    )


def _fields(text: str) -> list[Any]:
    data = decode_json(text)
    if type(data) is not list or len(data) != _LENGTH or data[0] != REF_VERSION:
        raise ValueError("not this ledger's packed SampleRef")
    if type(data[3]) is not dict or type(data[4]) is not list or type(data[14]) is not dict:
        raise TypeError("packed SampleRef: feature keys, specs or metadata malformed")
    return data


def _trusted(text: str) -> SampleRef:
    """The ref of text whose CRC matched: this ledger packed it from a validated ref."""
    (_, sid, uri, keys, specs, gen, task, run, strategy, schema, nbytes, tokens, target, draft,
     meta) = _fields(text)  # fmt: skip
    flat = True
    for value in meta.values():
        if type(value) not in SCALARS:
            flat = False
            break
    return SampleRef.from_validated(
        sample_id=sid,
        store_uri=uri,
        feature_keys=FrozenDict(keys),
        feature_specs=FrozenDict({s[0]: checked_spec(s[0], s[1], s[2]) for s in specs}),
        generation=gen,
        source_task_id=task,
        run_id=run,
        strategy=strategy,
        schema_version=schema,
        estimated_bytes=nbytes,
        num_tokens=tokens,
        target_version=target,
        draft_weight_version=draft,
        metadata=FrozenDict(meta) if flat else freeze_parsed(meta),
    )


def _validated(text: str) -> SampleRef:
    """The ref of packed text without a CRC to trust: every field through the constructor."""
    (_, sid, uri, keys, specs, gen, task, run, strategy, schema, nbytes, tokens, target, draft,
     meta) = _fields(text)  # fmt: skip
    built = {}
    for spec in specs:
        if type(spec) is not list or len(spec) != 3 or type(spec[1]) is not list:
            raise TypeError(f"packed SampleRef: feature spec {spec!r} malformed")
        built[spec[0]] = FeatureSpec(spec[0], tuple(spec[1]), spec[2])
    return SampleRef(
        sample_id=sid,
        store_uri=uri,
        feature_keys=keys,
        feature_specs=built,
        generation=gen,
        source_task_id=task,
        run_id=run,
        strategy=strategy,
        schema_version=schema,
        estimated_bytes=nbytes,
        num_tokens=tokens,
        target_version=target,
        draft_weight_version=draft,
        metadata=meta,
    )


def unpack_ref(text: str, where: str) -> SampleRef:
    """Rebuild a stored ref with full validation (packed or the codec's object text);
    ``CorruptRecordError`` naming ``where`` if it does not decode.
    """
    if text[:1] != "[":
        return decode_ref(text, where)
    try:
        return _validated(text)
    except (DataflowError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise CorruptRecordError(f"{where}: stored ref does not decode ({exc})") from None


def read_ref(text: str, crc: int | None, sample_id: str, where: str) -> SampleRef:
    """The ref of row ``sample_id`` from its stored text and the CRC-32 stored at commit, as
    ``_serial.decode_checked_ref`` guarantees for either text form: a matching CRC rebuilds
    the ref without re-validating it, no CRC (a row from before CRCs) validates it in full,
    and a mismatch, malformed text or a ref of another id is ``CorruptRecordError``.
    """
    if text[:1] != "[":
        return decode_checked_ref(text, crc, sample_id, where)
    if crc is None:
        ref = unpack_ref(text, where)
    else:
        if zlib.crc32(text.encode()) != crc:
            raise CorruptRecordError(
                f"{where}: stored ref fails its checksum (the text changed after commit)"
            )
        try:
            ref = _trusted(text)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise CorruptRecordError(f"{where}: stored ref does not decode ({exc})") from None
    if ref.sample_id != sample_id:
        raise CorruptRecordError(f"{where}: stored ref is of sample {ref.sample_id!r}")
    return ref
