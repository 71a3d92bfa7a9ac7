"""``open_ledger(uri, **options)``: one entry point for every ledger backend."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from dataflow.contracts.errors import InvalidInputError
from dataflow.contracts.protocols import Ledger
from dataflow.contracts.uris import ParsedURI, parse_ledger_uri

# Options a URI query may carry, with the type to parse them as; keyword options may also be
# passed to open_ledger directly (a keyword and the same query option together is an error).
_QUERY_OPTIONS: dict[str, Callable[[str], Any]] = {
    "max_prompt_attempts": int,
    "busy_timeout_s": float,
    "connect_timeout_s": float,
    "op_timeout_s": float,
    "namespace": str,
}
_BACKEND_OPTIONS = {
    "noop": frozenset(),
    "memory": frozenset({"max_prompt_attempts", "clock"}),
    "sqlite": frozenset({"max_prompt_attempts", "clock", "busy_timeout_s", "read_only"}),
    "redis": frozenset(
        {"max_prompt_attempts", "clock", "connect_timeout_s", "op_timeout_s", "namespace"}
    ),
}


def _options(parsed: ParsedURI, given: Mapping[str, Any]) -> dict[str, Any]:
    allowed = _BACKEND_OPTIONS[parsed.scheme]
    merged: dict[str, Any] = {}
    for name, raw in parsed.options.items():
        if name not in allowed:
            raise InvalidInputError(
                f"unknown option {name!r} in {parsed.uri!r}; {parsed.scheme}:// accepts "
                f"{sorted(allowed) or 'none'}"
            )
        if name in given:
            raise InvalidInputError(f"option {name!r} given both in the URI and as a keyword")
        try:
            merged[name] = _QUERY_OPTIONS[name](raw)
        except (KeyError, ValueError):
            raise InvalidInputError(
                f"option {name}={raw!r} in {parsed.uri!r} does not parse"
            ) from None
    for name, value in given.items():
        if name not in allowed:
            raise InvalidInputError(
                f"unknown option {name!r} for {parsed.scheme}://; accepted: {sorted(allowed) or 'none'}"
            )
        merged[name] = value
    return merged


def open_ledger(uri: str, **options: Any) -> Ledger:
    """Open the ledger a URI names: ``noop://``, ``memory://[name]``, ``sqlite:///path``,
    ``redis://host:port/db``.

    Options (keyword or ``?name=value`` in the URI): ``max_prompt_attempts`` (default 3),
    ``clock`` (keyword only; wall-clock seconds for lease deadlines), SQLite's
    ``busy_timeout_s`` (default 30), Redis's ``connect_timeout_s`` (default 5),
    ``op_timeout_s`` (default 30) and ``namespace`` (key prefix; default ``default``).
    SQLite's ``read_only=True`` (keyword only) opens an existing ledger file with ``mode=ro``:
    the file is never created, written or switched to WAL (for read-only commands like
    ``status``); any write through that ledger is refused.

    A bad URI or option raises ``InvalidInputError``; an unreachable Redis or an SQLite path
    that cannot be opened ``BackendUnavailableError``; a file that is not a ledger
    ``CorruptRecordError``.
    """
    parsed = parse_ledger_uri(uri)
    opts = _options(parsed, options)
    if parsed.scheme == "noop":
        from dataflow.control.ledger.noop import NoopLedger

        return NoopLedger(uri)
    from dataflow.control.ledger._ledger import StorageLedger
    from dataflow.control.ledger._tx import LedgerStorage

    common = {k: opts.pop(k) for k in ("max_prompt_attempts", "clock") if k in opts}
    storage: LedgerStorage
    if parsed.scheme == "memory":
        from dataflow.control.ledger.memory import MemoryStorage

        storage = MemoryStorage(parsed.location)
    elif parsed.scheme == "sqlite":
        from dataflow.control.ledger.sqlite import SQLiteStorage

        storage = SQLiteStorage(parsed.location, **opts)
    else:
        from dataflow.control.ledger.redis import RedisStorage

        storage = RedisStorage(parsed, **opts)
    try:
        return StorageLedger(storage, uri, **common)
    except BaseException:
        storage.close()
        raise
