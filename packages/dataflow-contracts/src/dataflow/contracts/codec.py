"""JSON codecs for every record, with a schema version per record kind.

Wire shape: ``{"kind": "SampleRef", "v": 1, <fields>}``. Decoding is strict: the kind must match,
a version newer than this reader's is refused (:class:`SchemaVersionError`), unknown fields are
refused, and every field is type-checked before the record's own validation runs; each error
names the offending field path. ``decode(encode(r)) == r`` for every record ``r``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from dataflow.contracts.checks import is_int, is_number
from dataflow.contracts.errors import InvalidInputError, InvalidRecordError, SchemaVersionError
from dataflow.contracts.features import FeatureHandle, FeatureSpec, SampleRef
from dataflow.contracts.frozen import freeze_json, thaw_json
from dataflow.contracts.prompt import PromptTask
from dataflow.contracts.states import (
    CommitResult,
    GcReport,
    LedgerStatus,
    ReconcileResult,
    RunMarkers,
    StoreHealth,
    Window,
)
from dataflow.contracts.weights import WeightVersion

R = TypeVar("R")

SCHEMA_VERSIONS: Mapping[str, int] = types.MappingProxyType(
    {
        "PromptTask": 1,
        "FeatureSpec": 1,
        "SampleRef": 1,
        "FeatureHandle": 1,
        "WeightVersion": 1,
        "RunMarkers": 1,
        "LedgerStatus": 1,
        "StoreHealth": 1,
        "GcReport": 1,
        "CommitResult": 1,
        "Window": 1,
        "ReconcileResult": 1,
    }
)
"""The newest schema version of each record kind this code writes and reads."""

_RECORDS: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        PromptTask,
        FeatureSpec,
        SampleRef,
        FeatureHandle,
        WeightVersion,
        RunMarkers,
        LedgerStatus,
        StoreHealth,
        GcReport,
        CommitResult,
        Window,
        ReconcileResult,
    )
}
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {key: _plain(child) for key, child in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(child) for child in value]
    return thaw_json(value)


def encode(record: Any) -> dict[str, Any]:
    """Return the JSON-ready dict of a record, tagged with its kind and schema version."""
    kind = type(record).__name__
    if _RECORDS.get(kind) is not type(record):
        raise InvalidInputError(f"cannot encode {type(record).__qualname__}: not a dataflow record")
    body = _plain(record)
    return {"kind": kind, "v": SCHEMA_VERSIONS[kind], **body}


def dumps(record: Any) -> str:
    """Compact, key-sorted JSON text of a record (stable: equal records give equal text)."""
    return json.dumps(encode(record), separators=(",", ":"), sort_keys=True, allow_nan=False)


def _fail(path: str, expected: str, value: Any) -> typing.NoReturn:
    raise InvalidRecordError(f"{path} must be {expected}, got {type(value).__name__} {value!r:.80}")


def _decode_scalar(hint: type, value: Any, path: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            _fail(path, "a bool", value)
        return value
    if hint is int:
        if not is_int(value):
            _fail(path, "an int", value)
        return value
    if hint is float:
        if not is_number(value):
            _fail(path, "a number", value)
        return float(value)
    if not isinstance(value, str):
        _fail(path, "a str", value)
    return value


def _decode_json(value: Any, path: str) -> Any:
    try:
        return freeze_json(value, path)
    except InvalidInputError as exc:
        raise InvalidRecordError(str(exc)) from None


def _decode_enum(hint: type[enum.Enum], value: Any, path: str) -> Any:
    try:
        return hint(value)
    except ValueError:
        _fail(path, f"one of {[m.value for m in hint]}", value)


def _decode_tuple(item_hint: Any, value: Any, path: str) -> tuple[Any, ...]:
    if not isinstance(value, list):
        _fail(path, "a list", value)
    return tuple(_decode_value(item_hint, v, f"{path}[{i}]") for i, v in enumerate(value))


def _decode_mapping(value_hint: Any, value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail(path, "an object", value)
    return {k: _decode_value(value_hint, v, f"{path}[{k!r}]") for k, v in value.items()}


def _decode_value(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return _decode_json(value, path)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        return _decode_value(next(a for a in args if a is not type(None)), value, path)
    if hint in (bool, int, float, str):
        return _decode_scalar(hint, value, path)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _decode_enum(hint, value, path)
    if origin is tuple:
        return _decode_tuple(args[0], value, path)
    if origin in (Mapping, dict):
        return _decode_mapping(args[1], value, path)
    if dataclasses.is_dataclass(hint):
        return _decode_fields(typing.cast(type, hint), value, path)
    raise InvalidRecordError(f"{path}: no decoder for {hint!r}")  # pragma: no cover - a bug


def _decode_fields(cls: type[R], body: Any, path: str, skip: tuple[str, ...] = ()) -> R:
    if not isinstance(body, dict):
        _fail(path, "an object", body)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(body) - set(fields) - set(skip))
    if unknown:
        raise InvalidRecordError(f"{path} has unknown field(s) {unknown}")
    kwargs = {}
    for name, f in fields.items():
        if name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise InvalidRecordError(f"{path}.{name} is missing")
            continue
        kwargs[name] = _decode_value(hints[name], body[name], f"{path}.{name}")
    try:
        return cls(**kwargs)
    except InvalidRecordError:
        raise
    except InvalidInputError as exc:
        raise InvalidRecordError(f"{path}: {exc}") from None


def decode(data: Any, expected: type[R]) -> R:
    """Rebuild a record of type ``expected`` from :func:`encode`'s output.

    Raises :class:`SchemaVersionError` for a newer version and :class:`InvalidRecordError` for
    a wrong kind, an unknown, missing or ill-typed field.
    """
    kind = expected.__name__
    if _RECORDS.get(kind) is not expected:
        raise InvalidInputError(f"cannot decode {expected.__qualname__}: not a dataflow record")
    if not isinstance(data, dict):
        _fail(kind, "a JSON object", data)
    if data.get("kind") != kind:
        raise InvalidRecordError(f"expected a {kind} record, got kind {data.get('kind')!r}")
    version = data.get("v")
    if not is_int(version) or version < 1:
        raise InvalidRecordError(f"{kind}.v (schema version) must be an int >= 1, got {version!r}")
    if version > SCHEMA_VERSIONS[kind]:
        raise SchemaVersionError(
            f"{kind} record has schema version {version}, newer than the {SCHEMA_VERSIONS[kind]} "
            "this reader supports; upgrade dataflow-contracts"
        )
    return _decode_fields(expected, data, kind, skip=("kind", "v"))


def loads(text: str | bytes, expected: type[R]) -> R:
    """Parse JSON text and :func:`decode` it; malformed JSON is an :class:`InvalidRecordError`."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRecordError(f"{expected.__name__}: not valid JSON ({exc})") from None
    return decode(data, expected)
