"""One error taxonomy shared by every dataflow package.

Every error a dataflow component raises on purpose derives from :class:`DataflowError`, so a
caller can catch the whole family at once, or one precise kind. Several kinds also derive from
the nearest builtin (``ValueError``, ``LookupError``, ``PermissionError``, ``ConnectionError``)
so code written against the standard library keeps working.
"""

from __future__ import annotations


class DataflowError(Exception):
    """Base of every error raised on purpose by dataflow."""


class InvalidInputError(DataflowError, ValueError):
    """An argument, id, URI, record or config value is malformed; nothing was changed."""


class InvalidRecordError(InvalidInputError):
    """A serialised record is malformed: wrong kind, missing or ill-typed field."""


class SchemaVersionError(InvalidRecordError):
    """A record was written by a newer schema version than this reader understands."""


class SchemaMismatchError(DataflowError):
    """Features disagree with what was declared: dtype, shape, names, strategy or version."""


class NotFoundError(DataflowError, LookupError):
    """The named sample, task, key or version does not exist (or no longer exists)."""


class StaleGenerationError(NotFoundError):
    """A ref or handle points at an older generation of a sample than the one stored."""


class CapacityExceededError(DataflowError):
    """An operation would pass a hard bound (resident bytes, in-flight cap); nothing was changed."""


class UnauthorizedError(DataflowError, PermissionError):
    """A missing or wrong credential was presented to a backend that requires one."""


class LedgerConflictError(DataflowError):
    """A state transition is not allowed from the record's current state; nothing was changed."""


class RunFailedError(DataflowError):
    """The run (or the other side of it) failed; never to be mistaken for a clean end of stream."""


class BackendUnavailableError(DataflowError, ConnectionError):
    """A backend (Redis, Mooncake master, a directory) cannot be reached within its timeout."""


class CorruptRecordError(DataflowError):
    """Stored bytes or rows fail their integrity check (torn write, bad checksum, bad file)."""


class ClosedError(DataflowError):
    """The object was closed and cannot be used any more."""


__all__ = [
    "BackendUnavailableError",
    "CapacityExceededError",
    "ClosedError",
    "CorruptRecordError",
    "DataflowError",
    "InvalidInputError",
    "InvalidRecordError",
    "LedgerConflictError",
    "NotFoundError",
    "RunFailedError",
    "SchemaMismatchError",
    "SchemaVersionError",
    "StaleGenerationError",
    "UnauthorizedError",
]
