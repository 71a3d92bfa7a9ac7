"""Argument checks shared by the control-plane modules (each raises ``InvalidInputError``)."""

from __future__ import annotations

from typing import Any

from dataflow.contracts.checks import is_int, is_number
from dataflow.contracts.errors import InvalidInputError


def positive_int(owner: str, name: str, value: Any) -> int:
    """Return ``value`` if it is an ``int`` ≥ 1 (never a ``bool``), else refuse it."""
    if not is_int(value) or value < 1:
        raise InvalidInputError(f"{owner}: {name} must be an int >= 1, got {value!r}")
    return value


def non_negative_int(owner: str, name: str, value: Any) -> int:
    """Return ``value`` if it is an ``int`` ≥ 0 (never a ``bool``), else refuse it."""
    if not is_int(value) or value < 0:
        raise InvalidInputError(f"{owner}: {name} must be an int >= 0, got {value!r}")
    return value


def optional_timeout(owner: str, value: Any) -> float | None:
    """Return ``value`` if it is ``None`` or a number ≥ 0, else refuse it."""
    if value is None:
        return None
    if not is_number(value) or value < 0:
        raise InvalidInputError(f"{owner}: timeout must be None or a number >= 0, got {value!r}")
    return float(value)
