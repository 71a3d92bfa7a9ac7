"""Validation of the ids that become file names, shared-memory names and database keys.

A sample id is used verbatim as part of a path (``dir://``), a POSIX shared-memory name
(``shm://``), a Mooncake key and a ledger primary key, so anything that could escape a directory,
truncate a C string or confuse a terminal is refused up front.
"""

from __future__ import annotations

import re

from dataflow.contracts.errors import InvalidInputError

MAX_ID_LENGTH = 160
"""Longest accepted id: leaves room for a prefix and suffix inside a 255-byte file name."""

_ALLOWED = re.compile(r"[A-Za-z0-9_.:=+@-]+")


def validate_id(value: object, kind: str = "id") -> str:
    r"""Return ``value`` unchanged if it is a safe id, else raise :class:`InvalidInputError`.

    Safe means: a non-empty ``str`` of at most :data:`MAX_ID_LENGTH` characters drawn from
    ``A-Z a-z 0-9 _ . : = + @ -``, not starting with ``.`` or ``-`` and not containing ``..``.
    So ``/``, ``\``, NUL, whitespace, control characters and non-ASCII are all refused.
    """
    if (  # the common, valid case in one test; the checks below only to name the problem
        type(value) is str
        and 0 < len(value) <= MAX_ID_LENGTH
        and value[0] not in ".-"
        and ".." not in value
        and _ALLOWED.fullmatch(value)
    ):
        return value
    if not isinstance(value, str):
        raise InvalidInputError(f"{kind} must be a str, got {type(value).__name__}")
    if not value:
        raise InvalidInputError(f"{kind} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidInputError(
            f"{kind} is {len(value)} characters long; the limit is {MAX_ID_LENGTH}"
        )
    # One match for the common, valid case; the per-character scan only to name the culprit.
    bad = None if _ALLOWED.fullmatch(value) else next(c for c in value if not _ALLOWED.fullmatch(c))
    if bad is not None:
        raise InvalidInputError(
            f"{kind} {value!r} contains the forbidden character {bad!r}; "
            "allowed: letters, digits and _ . : = + @ -"
        )
    if value[0] in ".-":
        raise InvalidInputError(f"{kind} {value!r} must not start with {value[0]!r}")
    if ".." in value:
        raise InvalidInputError(f"{kind} {value!r} must not contain '..'")
    return value


def validate_sample_id(value: object) -> str:
    """Validate a sample id (see :func:`validate_id`)."""
    return validate_id(value, "sample id")


def validate_task_id(value: object) -> str:
    """Validate a prompt task id (see :func:`validate_id`)."""
    return validate_id(value, "task id")
