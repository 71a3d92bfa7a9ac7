"""How to reach a Mooncake cluster: the settings a ``mooncake://`` URI and its options name.

``mooncake://HOST:PORT?segment=1GiB&buffer=64MiB`` points at a ``mooncake_master`` RPC address.
Options (query string or keyword arguments, keywords win):

- ``metadata``: Mooncake's ``metadata_server`` (default ``P2PHANDSHAKE``; or an
  ``http://…/metadata`` URL of the master's HTTP metadata server);
- ``local_hostname``: the address peers reach this client on (default ``127.0.0.1``, only
  allowed when the master is on loopback: across hosts it must be given);
- ``protocol`` (``tcp`` | ``rdma``), ``rdma_devices``;
- ``segment``: bytes of this process's memory mounted into the cluster (default 1 GiB);
- ``buffer``: the client's local transfer buffer (default 64 MiB);
- ``connect_timeout_s``: bound on reaching the master and its handshake (default 5 s);
- ``handshake_probe``: run Mooncake's ``setup()`` first in a child process under the timeout
  (default true), because an in-process ``setup()`` against something that is not a master
  blocks the whole interpreter (it holds the GIL) for over a minute;
- ``replicas`` (default 1) and ``hard_pin`` (default true: Mooncake never evicts our objects;
  this store alone decides when features die).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dataflow.contracts import InvalidInputError
from dataflow.contracts.uris import parse_store_uri

GiB = 1 << 30
MiB = 1 << 20

_SIZE = re.compile(r"(\d+)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": MiB, "g": GiB}
_PROTOCOLS = ("tcp", "rdma")


@dataclass(frozen=True)
class MooncakeSettings:
    """Validated connection settings for one Mooncake client (sizes in bytes)."""

    master_host: str
    master_port: int
    metadata_server: str = "P2PHANDSHAKE"
    local_hostname: str = "127.0.0.1"
    protocol: str = "tcp"
    rdma_devices: str = ""
    segment_bytes: int = GiB
    buffer_bytes: int = 64 * MiB
    connect_timeout_s: float = 5.0
    handshake_probe: bool = True
    replicas: int = 1
    hard_pin: bool = True

    @property
    def master_address(self) -> str:
        """``host:port`` as Mooncake's ``master_server_addr`` wants it."""
        return f"{self.master_host}:{self.master_port}"

    def setup_args(self) -> tuple[str, str, int, int, str, str, str]:
        """Positional arguments of ``MooncakeDistributedStore.setup``."""
        return (
            self.local_hostname,
            self.metadata_server,
            self.segment_bytes,
            self.buffer_bytes,
            self.protocol,
            self.rdma_devices,
            self.master_address,
        )


def parse_size(value: object, name: str) -> int:
    """``1GiB``, ``64MiB``, ``4096`` or an int -> bytes (>= 0); else ``InvalidInputError``."""
    if isinstance(value, bool):
        raise InvalidInputError(f"mooncake option {name!r} must be a size, got {value!r}")
    if isinstance(value, int):
        number, unit = value, ""
    else:
        match = _SIZE.fullmatch(str(value).strip())
        if match is None:
            raise InvalidInputError(
                f"mooncake option {name!r} must be a size like 4096, 64MiB or 1GiB, got {value!r}"
            )
        number, unit = int(match.group(1)), match.group(2).lower()
    if number < 0:
        raise InvalidInputError(f"mooncake option {name!r} must be >= 0, got {value!r}")
    return number * _UNITS[unit[:1]]


def _parse_bool(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InvalidInputError(f"mooncake option {name!r} must be true or false, got {value!r}")


def _parse_positive(value: object, name: str, kind: type) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or not number > 0:
        raise InvalidInputError(f"mooncake option {name!r} must be a number > 0, got {value!r}")
    return number


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings_from_uri(uri: str, options: Mapping[str, object] | None = None) -> MooncakeSettings:
    """Build settings from a ``mooncake://host:port`` URI, its query string and ``options``.

    Raises ``InvalidInputError`` naming the option for an unknown option or a bad value.
    """
    parsed = parse_store_uri(uri)
    if parsed.scheme != "mooncake":
        raise InvalidInputError(f"not a mooncake:// URI: {uri!r}")
    merged: dict[str, object] = {**parsed.options, **dict(options or {})}
    known = {
        "metadata",
        "local_hostname",
        "protocol",
        "rdma_devices",
        "segment",
        "buffer",
        "connect_timeout_s",
        "handshake_probe",
        "replicas",
        "hard_pin",
    }
    unknown = sorted(set(merged) - known)
    if unknown:
        raise InvalidInputError(
            f"unknown mooncake option(s) {unknown} in {uri!r}; known: {sorted(known)}"
        )
    protocol = str(merged.get("protocol", "tcp"))
    if protocol not in _PROTOCOLS:
        raise InvalidInputError(f"mooncake option 'protocol' must be one of {_PROTOCOLS}")
    local = merged.get("local_hostname")
    if local is None:
        if not _is_loopback(parsed.host):
            raise InvalidInputError(
                f"mooncake master {parsed.location} is not on loopback: pass local_hostname= "
                "(this host's address that the other Mooncake clients can reach)"
            )
        local = "127.0.0.1"
    return MooncakeSettings(
        master_host=parsed.host,
        master_port=parsed.port,
        metadata_server=str(merged.get("metadata", "P2PHANDSHAKE")),
        local_hostname=str(local),
        protocol=protocol,
        rdma_devices=str(merged.get("rdma_devices", "")),
        segment_bytes=parse_size(merged.get("segment", GiB), "segment"),
        buffer_bytes=parse_size(merged.get("buffer", 64 * MiB), "buffer"),
        connect_timeout_s=float(
            _parse_positive(merged.get("connect_timeout_s", 5.0), "connect_timeout_s", float)
        ),
        handshake_probe=_parse_bool(merged.get("handshake_probe", True), "handshake_probe"),
        replicas=int(_parse_positive(merged.get("replicas", 1), "replicas", int)),
        hard_pin=_parse_bool(merged.get("hard_pin", True), "hard_pin"),
    )
