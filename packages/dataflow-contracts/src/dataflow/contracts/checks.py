"""Small field validators shared by the records' ``__post_init__`` methods."""

from __future__ import annotations

from typing import Any, TypeGuard

from dataflow.contracts.errors import InvalidInputError


def is_int(value: Any) -> TypeGuard[int]:
    """Whether ``value`` is an ``int`` and not a ``bool`` (the one integer check every plane uses)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> TypeGuard[int | float]:
    """Whether ``value`` is an ``int`` or a ``float`` and not a ``bool``."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_type(owner: str, name: str, value: Any, kind: type | tuple[type, ...]) -> None:
    """Refuse ``value`` unless it is an instance of ``kind`` (``bool`` is never an ``int``)."""
    if type(value) is kind:  # the common case, exactly the type asked for
        return
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise InvalidInputError(
            f"{owner}.{name} must be {expected}, got {type(value).__name__} {value!r}"
        )


def check_non_negative(owner: str, name: str, value: Any) -> None:
    """Refuse anything but an ``int`` ≥ 0."""
    if type(value) is int and value >= 0:
        return
    check_type(owner, name, value, int)
    if value < 0:
        raise InvalidInputError(f"{owner}.{name} must be >= 0, got {value}")


def check_text(owner: str, name: str, value: Any, *, allow_empty: bool = True) -> None:
    """Refuse non-str values, and empty strings unless allowed."""
    if type(value) is str and (value or allow_empty):
        return
    check_type(owner, name, value, str)
    if not allow_empty and not value:
        raise InvalidInputError(f"{owner}.{name} must not be empty")
