"""Parsing and validation of store and ledger URIs.

``open_store`` and ``open_ledger`` in the planes dispatch on the parsed scheme; parsing lives here
so both planes, the launcher and the CLI agree on what a URI means and refuse the same bad ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import SplitResult, parse_qsl, urlsplit

from dataflow.contracts.errors import InvalidInputError
from dataflow.contracts.frozen import frozen_dict
from dataflow.contracts.ids import validate_id

STORE_SCHEMES = ("memory", "file", "shm", "dir", "mooncake")
"""Feature-store backends, by URI scheme."""

LEDGER_SCHEMES = ("noop", "memory", "sqlite", "redis")
"""Ledger backends, by URI scheme."""

_NEEDS_PATH = frozenset({"file", "dir", "sqlite"})
_NEEDS_HOST = frozenset({"redis", "mooncake"})
_DEFAULT_PORTS = {"redis": 6379, "mooncake": 50051}


@dataclass(frozen=True)
class ParsedURI:
    """A validated backend URI.

    ``location`` is the file-system path for path-based schemes (``file``, ``dir``, ``sqlite``),
    the name for in-process schemes (``memory``, ``shm``, may be empty), and ``host:port`` for
    network schemes. ``options`` holds the query string (``?k=v&…``), read-only.
    """

    uri: str
    scheme: str
    location: str
    host: str = ""
    port: int = 0
    database: int = 0
    options: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", frozen_dict(self.options))


def _parse(uri: object, allowed: tuple[str, ...], what: str) -> ParsedURI:
    if not isinstance(uri, str) or not uri:
        raise InvalidInputError(f"{what} URI must be a non-empty str, got {uri!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in uri):
        raise InvalidInputError(f"{what} URI {uri!r} contains a control character")
    if "://" not in uri:
        raise InvalidInputError(
            f"{what} URI {uri!r} has no scheme; expected one of "
            + ", ".join(f"{s}://" for s in allowed)
        )
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in allowed:
        raise InvalidInputError(
            f"unknown {what} scheme {parts.scheme!r} in {uri!r}; expected one of "
            + ", ".join(f"{s}://" for s in allowed)
        )
    if parts.fragment:
        raise InvalidInputError(f"{what} URI {uri!r} must not have a #fragment")
    try:
        options = dict(
            parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        )
    except ValueError as exc:
        raise InvalidInputError(f"{what} URI {uri!r} has a malformed query string: {exc}") from None

    if scheme in _NEEDS_PATH:
        return _path_uri(uri, scheme, parts, options, what)
    if scheme in _NEEDS_HOST:
        return _host_uri(uri, scheme, parts, options, what)
    return _named_uri(uri, scheme, parts, options)


def _path_uri(
    uri: str, scheme: str, parts: SplitResult, options: dict[str, str], what: str
) -> ParsedURI:
    # sqlite:///abs/path -> /abs/path ; sqlite://rel/path -> rel/path
    location = parts.netloc + parts.path
    if not location or location == "/":
        raise InvalidInputError(f"{what} URI {uri!r} needs a path, e.g. {scheme}:///tmp/run")
    return ParsedURI(uri=uri, scheme=scheme, location=location, options=options)


def _host_uri(
    uri: str, scheme: str, parts: SplitResult, options: dict[str, str], what: str
) -> ParsedURI:
    host = parts.hostname or ""
    if not host:
        raise InvalidInputError(f"{what} URI {uri!r} needs a host, e.g. {scheme}://127.0.0.1")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise InvalidInputError(f"{what} URI {uri!r} has an invalid port") from None
    database = 0
    path = parts.path.strip("/")
    if scheme == "redis" and path:
        if not path.isdigit():
            raise InvalidInputError(
                f"{what} URI {uri!r}: the Redis database must be a number, got {path!r}"
            )
        database = int(path)
    elif path:
        raise InvalidInputError(f"{what} URI {uri!r} must not have a path")
    return ParsedURI(
        uri=uri,
        scheme=scheme,
        location=f"{host}:{port}",
        host=host,
        port=port,
        database=database,
        options=options,
    )


def _named_uri(uri: str, scheme: str, parts: SplitResult, options: dict[str, str]) -> ParsedURI:
    # memory://name, shm://name, noop://
    name = (parts.netloc + parts.path).strip("/")
    if "/" in name:
        raise InvalidInputError(f"{scheme} URI {uri!r}: the name must not contain '/'")
    if name:
        validate_id(name, f"{scheme} name")
    return ParsedURI(uri=uri, scheme=scheme, location=name, options=options)


def parse_store_uri(uri: object) -> ParsedURI:
    """Parse a feature-store URI (``memory://``, ``file:///p``, ``shm://name``, ``dir:///p``,
    ``mooncake://host:port``); raise :class:`InvalidInputError` naming the problem.
    """
    return _parse(uri, STORE_SCHEMES, "store")


def parse_ledger_uri(uri: object) -> ParsedURI:
    """Parse a ledger URI (``noop://``, ``memory://``, ``sqlite:///path``,
    ``redis://host:port/db``); raise :class:`InvalidInputError` naming the problem.
    """
    return _parse(uri, LEDGER_SCHEMES, "ledger")
