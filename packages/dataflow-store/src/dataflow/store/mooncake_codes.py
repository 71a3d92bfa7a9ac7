"""Mooncake's returned status codes, named and turned into dataflow errors.

The Mooncake Python binding reports failures as negative integers instead of raising. This
module is the one place that knows what they mean (``mooncake-store/include/types.h``), so the
rest of the backend only ever sees dataflow errors that name the operation, the key and the code.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from dataflow.contracts import (
    BackendUnavailableError,
    CapacityExceededError,
    DataflowError,
    InvalidInputError,
    NotFoundError,
)

OK = 0
INTERNAL_ERROR = -1
NO_AVAILABLE_HANDLE = -200
INVALID_KEY = -400
INVALID_PARAMS = -600
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
OBJECT_HAS_LEASE = -706
TRANSFER_FAIL = -800
RPC_FAIL = -900

CODE_NAMES: Mapping[int, str] = MappingProxyType(
    {
        OK: "OK",
        INTERNAL_ERROR: "INTERNAL_ERROR",
        -10: "BUFFER_OVERFLOW",
        -100: "SHARD_INDEX_OUT_OF_RANGE",
        -101: "SEGMENT_NOT_FOUND",
        -102: "SEGMENT_ALREADY_EXISTS",
        -103: "CLIENT_NOT_FOUND",
        NO_AVAILABLE_HANDLE: "NO_AVAILABLE_HANDLE",
        -300: "INVALID_VERSION",
        INVALID_KEY: "INVALID_KEY",
        -500: "WRITE_FAIL",
        INVALID_PARAMS: "INVALID_PARAMS",
        -601: "ILLEGAL_CLIENT",
        -700: "INVALID_WRITE",
        -701: "INVALID_READ",
        -702: "INVALID_REPLICA",
        -703: "REPLICA_IS_NOT_READY",
        OBJECT_NOT_FOUND: "OBJECT_NOT_FOUND",
        OBJECT_ALREADY_EXISTS: "OBJECT_ALREADY_EXISTS",
        OBJECT_HAS_LEASE: "OBJECT_HAS_LEASE",
        -707: "LEASE_EXPIRED",
        -708: "OBJECT_HAS_REPLICATION_TASK",
        -710: "REPLICA_NOT_FOUND",
        -712: "REPLICA_IS_GONE",
        TRANSFER_FAIL: "TRANSFER_FAIL",
        RPC_FAIL: "RPC_FAIL",
        -1010: "UNAVAILABLE_IN_CURRENT_STATUS",
        -1011: "UNAVAILABLE_IN_CURRENT_MODE",
    }
)
"""Code -> Mooncake's name for it (the ones this backend can meet)."""

# Codes meaning "the master or a peer could not be reached / did not complete the transfer".
_UNAVAILABLE = frozenset({RPC_FAIL, TRANSFER_FAIL, -101, -103, -500, -700, -701, -707, -1010})


def code_name(code: int) -> str:
    """``-706 OBJECT_HAS_LEASE`` — how errors and reports show a code."""
    return f"{code} {CODE_NAMES.get(code, 'UNKNOWN')}"


def error_for(code: int, operation: str, key: str) -> DataflowError:
    """The dataflow error for a failed Mooncake call (``code`` < 0).

    Mapping: object not found -> ``NotFoundError``; no space left in any segment ->
    ``CapacityExceededError``; RPC or transfer failures -> ``BackendUnavailableError``; an
    invalid key -> ``InvalidInputError``; anything else -> ``DataflowError``. The message names
    the operation, the key and the code.
    """
    text = f"Mooncake {operation} of {key!r} failed: {code_name(code)}"
    if code == OBJECT_NOT_FOUND:
        return NotFoundError(text)
    if code == NO_AVAILABLE_HANDLE:
        return CapacityExceededError(
            text + " (no segment has room: mount more global segment memory or free samples)"
        )
    if code in _UNAVAILABLE:
        return BackendUnavailableError(text)
    if code == INVALID_KEY:
        return InvalidInputError(text)
    return DataflowError(text)
