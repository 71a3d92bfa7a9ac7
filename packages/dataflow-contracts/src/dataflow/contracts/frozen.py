"""Deep freezing of JSON-like values, so frozen records are immutable all the way down."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NoReturn

from dataflow.contracts.errors import InvalidInputError


class FrozenDict(dict[str, Any]):
    """A read-only ``dict``: every mutating method raises ``TypeError``.

    Unlike ``types.MappingProxyType`` it pickles (records cross process boundaries through
    ``multiprocessing`` and ``torch.distributed`` object collectives) and ``json.dumps`` takes
    it as it is.
    """

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("this mapping is read-only (part of a frozen dataflow record)")

    __setitem__ = __delitem__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse
    __ior__ = _refuse

    def __reduce__(self) -> tuple[type, tuple[dict[str, Any]]]:
        return (FrozenDict, (dict(self),))

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        return self


def frozen_dict(value: Mapping[str, Any]) -> FrozenDict:
    """A :class:`FrozenDict` copy of ``value`` (shallow)."""
    return value if type(value) is FrozenDict else FrozenDict(value)


JsonMap = Mapping[str, Any]
"""A read-only JSON object: str keys; values are None, bool, int, float, str, tuples, JsonMaps."""


_PLAIN = frozenset((int, str, bool, type(None)))
"""Element types :func:`freeze_json` returns as they are (a float is checked for NaN/inf)."""


def freeze_json(value: Any, path: str = "value") -> Any:
    """Return a deep read-only copy of a JSON-compatible value.

    dicts become read-only mappings, lists become tuples. Raises :class:`InvalidInputError`
    naming the path of anything that is not JSON-compatible (non-str keys, NaN, objects).
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError(f"{path} is {value!r}; JSON values must be finite")
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, child in value.items():
            if not isinstance(key, str):
                raise InvalidInputError(f"{path} has a non-str key {key!r}")
            out[key] = freeze_json(child, f"{path}[{key!r}]")
        return FrozenDict(out)
    if isinstance(value, (list, tuple)):
        if all(type(child) in _PLAIN for child in value):  # token ids: no element to check
            return tuple(value)
        return tuple(freeze_json(child, f"{path}[{i}]") for i, child in enumerate(value))
    raise InvalidInputError(
        f"{path} holds a {type(value).__module__}.{type(value).__qualname__}; "
        "only JSON values (None, bool, int, float, str, lists, str-keyed dicts) are allowed"
    )


def freeze_map(value: Any, path: str) -> JsonMap:
    """:func:`freeze_json` for a value that must be a JSON object."""
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"{path} must be a mapping, got {type(value).__name__}")
    frozen: JsonMap = freeze_json(value, path)
    return frozen


def thaw_json(value: Any) -> Any:
    """Inverse of :func:`freeze_json`: plain dicts and lists, ready for ``json.dumps``."""
    if isinstance(value, Mapping):
        return {key: thaw_json(child) for key, child in value.items()}
    if isinstance(value, tuple):
        return [thaw_json(child) for child in value]
    return value
