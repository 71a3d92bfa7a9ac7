"""Reading JSONL prompt files line by line, keeping every malformed line's number and reason."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dataflow.contracts import InvalidInputError

T = TypeVar("T")
_SHOWN = 10


class MalformedRecord(ValueError):
    """Raised by a record parser: the line is unusable, for the reason given."""


@dataclass(frozen=True)
class BadLine:
    """One unusable line: 1-based number and why."""

    line: int
    reason: str


def iter_json_lines(path: Path) -> Iterator[tuple[int, Any | BadLine]]:
    """Yield ``(line_number, object)`` per non-blank line, or a :class:`BadLine` for a line that
    is not UTF-8 or not JSON.
    """
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, BadLine(number, f"not UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, BadLine(number, f"not valid JSON ({exc.msg} at column {exc.colno})")


def describe_bad_lines(path: Path, bad: list[BadLine], limit: int) -> str:
    """A readable summary naming the first few bad lines."""
    shown = "; ".join(f"line {b.line}: {b.reason}" for b in bad[:_SHOWN])
    more = f"; … and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    return f"{path}: {len(bad)} malformed line(s), over the limit of {limit}: {shown}{more}"


def read_records(
    path: str | Path, parse: Callable[[Any], T], max_malformed: int
) -> tuple[list[tuple[int, T]], list[BadLine]]:
    """Parse every line of ``path`` with ``parse``.

    Returns the parsed records with their line numbers and the malformed lines. More than
    ``max_malformed`` malformed lines raise :class:`InvalidInputError` naming them.
    """
    file = Path(path)
    if not file.is_file():
        raise InvalidInputError(f"prompt file {str(file)!r} does not exist")
    records: list[tuple[int, T]] = []
    bad: list[BadLine] = []
    for number, obj in iter_json_lines(file):
        if isinstance(obj, BadLine):
            bad.append(obj)
            continue
        try:
            records.append((number, parse(obj)))
        except MalformedRecord as exc:
            bad.append(BadLine(number, str(exc)))
    if len(bad) > max_malformed:
        raise InvalidInputError(describe_bad_lines(file, bad, max_malformed))
    return records, bad
