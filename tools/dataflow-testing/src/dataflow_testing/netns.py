"""Virtual hosts on one machine for multi-host tests: network namespaces joined by a bridge.

One :class:`VirtualHosts` builds this (``N`` = a /24 of 198.18.0.0/15, ``p`` = prefix-pid-seq)::

    ns p-h0               ns p-h1               ns p-h2
    eth0 198.18.N.1/24    eth0 198.18.N.2/24    eth0 198.18.N.3/24
      | veth                | veth                | veth
    port0 ------------- br0 (ns p-sw) ------------- port2

Why a bridge in its own namespace rather than a star of veth pairs through a router: every host
is one L2 hop from every other, with no forwarding, no per-pair subnets and no routes to set up.
Every link is created directly inside its namespace, so the root namespace's links never change.

Isolation, the reason for most of this module: the hosts have only their connected /24 route and
no default route, so traffic to any other address fails inside the namespace ("Network is
unreachable") and nothing leaves the machine. In the root namespace the subnet gets an
``unreachable`` route (the guard) while the hosts live, so a stray connection from the test
process to a host address fails locally instead of following the default route out. The guard is
also the subnet's reservation: ``ip route add`` refuses a duplicate, so parallel runs never share
a subnet. Subnets come from 198.18.0.0/15 (RFC 2544, reserved for benchmarking, never routed on
the internet) and must overlap no route of the root namespace.

Ownership: namespace names (``<prefix>-<pid>-<seq>-<host>``) and the guard route's metric carry
the owning pid, so :func:`cleanup_leftovers` removes what a crashed run left without touching a
live run.

Run ``python -m dataflow_testing.netns check`` to see whether this machine can host them, and
``python -m dataflow_testing.netns cleanup`` to remove leftovers of crashed runs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

DEFAULT_PREFIX = "dft"
SUBNET_POOL = ipaddress.IPv4Network("198.18.0.0/15")
GUARD_PROTO = 215
"""Routing-protocol number tagging this module's guard routes (unassigned in rt_protos)."""

_IP_TIMEOUT = 15.0
_NAME_RE = re.compile(r"[a-z][a-z0-9]{0,7}")
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,11}")
_SWITCH = "sw"
_seq = itertools.count()


class VirtualHostError(RuntimeError):
    """A namespace, link, route or service of the virtual hosts could not be set up or removed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` with a bounded time; raise :class:`VirtualHostError` naming it on failure."""
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False
    )
    if check and proc.returncode != 0:
        raise VirtualHostError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` is a running (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name, which may itself contain ")".
    return stat[stat.rindex(")") + 2 :][:1] != "Z"


# --------------------------------------------------------------------------- capability


def netns_available() -> tuple[bool, str]:
    """Whether this machine can build virtual hosts, and why (an exact reason when it cannot).

    Checks root, the ``ip`` command, and actually creates (and removes) a probe namespace with a
    bridge and a veth pair, since containers may forbid any of those.
    """
    if os.geteuid() != 0:
        return False, (
            f"needs root (running as uid {os.geteuid()}): network namespaces, veth links and "
            "routes need CAP_SYS_ADMIN and CAP_NET_ADMIN"
        )
    if shutil.which("ip") is None:
        return False, "the `ip` command (iproute2) is not on PATH"
    probe = f"{DEFAULT_PREFIX}-{os.getpid()}-{next(_seq)}-probe"
    try:
        _ip("netns", "add", probe)
    except (VirtualHostError, OSError, subprocess.TimeoutExpired) as exc:
        return False, f"cannot create a network namespace: {exc}"
    try:
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
        _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    except (VirtualHostError, OSError, subprocess.TimeoutExpired) as exc:
        return False, f"cannot create a bridge and a veth pair in a network namespace: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    version = _ip("-V", check=False).stdout.strip()
    return True, f"root; {version}; namespaces with a bridge and veth pairs can be created"


def multihost_available() -> tuple[bool, str]:
    """:func:`netns_available` plus the service binaries that :func:`serve_cluster` runs."""
    ok, reason = netns_available()
    if not ok:
        return ok, reason
    for binary in ("redis-server", "mooncake_master"):
        if shutil.which(binary) is None:
            return False, f"`{binary}` is not on PATH"
    return True, reason


# --------------------------------------------------------------------------- leftovers


def _namespace_owner(name: str, prefix: str | None) -> int | None:
    """The owner pid in a namespace name made with ``prefix`` (any prefix when None)."""
    pattern = _PREFIX_RE.pattern if prefix is None else re.escape(prefix)
    match = re.fullmatch(rf"{pattern}-(\d+)-\d+-[a-z0-9]+", name)
    return int(match.group(1)) if match else None


def _list_namespaces() -> list[str]:
    # `ip netns list` prints "name" or "name (id: N)".
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def _guard_routes() -> list[tuple[str, int]]:
    """(subnet, owner pid) of every guard route in the root namespace."""
    out = _ip("-j", "-4", "route", "show", "table", "main", "proto", str(GUARD_PROTO)).stdout
    routes = json.loads(out) if out.strip() else []
    return [(r["dst"], int(r.get("metric", 0))) for r in routes if r.get("type") == "unreachable"]


def _kill_namespace(name: str, *, delete: bool = True, grace: float = 5.0) -> None:
    """SIGKILL every process inside namespace ``name`` and wait up to ``grace`` seconds for them;
    then (``delete``) remove the namespace. Raises :class:`VirtualHostError` naming survivors
    (the namespace is removed anyway: it is freed when they finally die).
    """
    out = _ip("netns", "pids", name, check=False).stdout
    pids = [int(p) for p in out.split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while (survivors := [p for p in pids if _pid_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    if delete:
        proc = _ip("netns", "del", name, check=False)
        if proc.returncode != 0 and name in _list_namespaces():
            raise VirtualHostError(f"cannot delete network namespace {name}: {proc.stderr.strip()}")
    if survivors:
        raise VirtualHostError(
            f"processes {survivors} in namespace {name} outlived SIGKILL by {grace:g} s"
        )


def _delete_guard(subnet: str, owner: int) -> None:
    proc = _ip(
        "route", "del", "unreachable", subnet, "proto", str(GUARD_PROTO), "metric", str(owner),
        check=False,
    )  # fmt: skip
    if proc.returncode != 0 and (subnet, owner) in _guard_routes():
        raise VirtualHostError(f"cannot delete guard route {subnet}: {proc.stderr.strip()}")


def cleanup_leftovers(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove what crashed runs left: namespaces named ``<prefix>-<pid>-…`` (with every process
    still inside) and guard routes whose owning pid is no longer running. Returns what was
    removed. A live run is never touched; a leftover whose pid was since reused by an unrelated
    process is left alone too (harmless: nothing routes to it).
    """
    _check_prefix(prefix)
    removed: list[str] = []
    ours: set[int] = set()  # dead owners whose namespaces carry this prefix
    for name in _list_namespaces():
        owner = _namespace_owner(name, prefix)
        if owner is not None and not _pid_alive(owner):
            _kill_namespace(name)
            removed.append(f"netns {name}")
            ours.add(owner)
    # A guard route has no prefix: take it when its dead owner's namespaces had this prefix, or
    # when no namespace of any prefix is left to say whose it was (a crash between reserving the
    # subnet and building, or between removing namespaces and the route).
    claimed = {_namespace_owner(name, None) for name in _list_namespaces()}
    for subnet, owner in _guard_routes():
        if not _pid_alive(owner) and (owner in ours or owner not in claimed):
            _delete_guard(subnet, owner)
            removed.append(f"route unreachable {subnet} metric {owner}")
    return removed


# --------------------------------------------------------------------------- subnet


def _routed_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 destination routed in the root namespace, in any table, except default."""
    out = _ip("-j", "-4", "route", "show", "table", "all").stdout
    networks = []
    for route in json.loads(out) if out.strip() else []:
        dst = route.get("dst", "default")
        if dst == "default":
            continue
        with contextlib.suppress(ValueError):
            networks.append(ipaddress.IPv4Network(dst, strict=False))
    return networks


def _reserve_subnet(owner: int) -> ipaddress.IPv4Network:
    """Pick a /24 of :data:`SUBNET_POOL` overlapping no root route and add its guard route."""
    candidates = list(SUBNET_POOL.subnets(new_prefix=24))
    start = (owner * 7919) % len(candidates)  # spread parallel runs over the pool
    routed = _routed_networks()
    for subnet in candidates[start:] + candidates[:start]:
        if any(subnet.overlaps(net) for net in routed):
            continue
        added = _ip(
            "route", "add", "unreachable", str(subnet), "proto", str(GUARD_PROTO),
            "metric", str(owner), check=False,
        )  # fmt: skip
        if added.returncode != 0:
            continue
        rivals = [o for s, o in _guard_routes() if s == str(subnet) and o != owner]
        if any(_pid_alive(o) for o in rivals):  # lost a race for this subnet: let the other keep it
            _delete_guard(str(subnet), owner)
            continue
        return subnet
    raise VirtualHostError(
        f"no /24 of {SUBNET_POOL} is free of the root namespace's routes; "
        "run `python -m dataflow_testing.netns cleanup` to remove leftovers of crashed runs"
    )


# --------------------------------------------------------------------------- hosts


_PORT_PROBE = """
import socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
while True:
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        sys.exit(0)
    except OSError:
        if time.monotonic() >= deadline:
            sys.exit(1)
        time.sleep(0.05)
"""


@dataclass
class VirtualHost:
    """One host: a network namespace with ``eth0`` at :attr:`address` on the shared bridge.

    Commands run through ``ip netns exec``, which execs the command in place: the pid of a
    :meth:`popen` process is the command's own pid, so signals reach it directly. Every process
    started here is killed when the :class:`VirtualHosts` closes.
    """

    name: str
    namespace: str
    address: str
    _processes: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def run(
        self, argv: Sequence[str], *, timeout: float = 60.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside this host, bounded by ``timeout`` seconds."""
        return subprocess.run(self.command(argv), timeout=timeout, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` inside this host. On return the process is inside the namespace
        (or has already exited); it is killed at teardown at the latest.
        """
        proc: subprocess.Popen[Any] = subprocess.Popen(self.command(argv), **kwargs)
        self._processes.append(proc)
        self._wait_until_inside(proc)
        return proc

    def _wait_until_inside(self, proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
        # `ip netns exec` joins the namespace a moment after the fork; until then signals and
        # `ip netns pids` would miss it.
        target = f"net:[{os.stat(f'/run/netns/{self.namespace}').st_ino}]"
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{proc.pid}/ns/net") == target:
                    return
            if time.monotonic() >= deadline:
                proc.kill()
                proc.wait(timeout=5)
                raise VirtualHostError(
                    f"process {proc.pid} did not enter namespace {self.namespace} in {timeout:g} s"
                )
            time.sleep(0.002)

    def python(
        self, code: str, *args: str, timeout: float = 60.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -c code args`` inside this host (same interpreter), capturing text output."""
        return self.run(
            [sys.executable, "-c", code, *args],
            timeout=timeout,
            capture_output=True,
            text=True,
            **kwargs,
        )

    def wait_for_port(self, port: int, timeout: float = 10.0, address: str | None = None) -> bool:
        """Poll from inside this host until ``address:port`` (default: this host's own address)
        accepts TCP connections; False once ``timeout`` seconds pass without it.
        """
        target = address or self.address
        try:
            proc = self.python(_PORT_PROBE, target, str(port), str(timeout), timeout=timeout + 15)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0

    def pids(self) -> list[int]:
        """Pids of every process currently inside this host's namespace."""
        return [int(p) for p in _ip("netns", "pids", self.namespace).stdout.split()]

    def crash(self) -> list[int]:
        """SIGKILL every process on this host (children of children too) and wait until they are
        gone, as if the machine lost power; the host itself stays up. Returns the killed pids.
        """
        killed = self.pids()
        _kill_namespace(self.namespace, delete=False)
        for proc in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        return killed

    def disconnect(self) -> None:
        """Take this host's ``eth0`` down: no other host reaches it until :meth:`reconnect`."""
        _ip("-n", self.namespace, "link", "set", "eth0", "down")

    def reconnect(self) -> None:
        """Bring ``eth0`` back up (its address and route are restored with it)."""
        _ip("-n", self.namespace, "link", "set", "eth0", "up")

    def _kill_started(self) -> None:
        for proc in self._processes:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        self._processes.clear()


def _check_prefix(prefix: str) -> None:
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(
            f"prefix must be 1-12 lowercase letters/digits starting with a letter, got {prefix!r}"
        )


def _host_names(hosts: int | Sequence[str]) -> list[str]:
    names = [f"h{i}" for i in range(hosts)] if isinstance(hosts, int) else list(hosts)
    if not 1 <= len(names) <= 200:
        raise ValueError(f"need between 1 and 200 hosts, got {len(names)}")
    for name in names:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name == _SWITCH:
            raise ValueError(
                "host names must be 1-8 lowercase letters/digits starting with a letter "
                f"(and not {_SWITCH!r}), got {name!r}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"host names must be unique, got {names}")
    return names


class VirtualHosts:
    """A context manager giving ``hosts`` virtual hosts (a count, or names) on one bridge.

    Guarantees: on entry every host has ``lo`` and ``eth0`` up and reaches every other host's
    :attr:`VirtualHost.address`, and no host has a route anywhere else; on exit — normal, by an
    exception, or by KeyboardInterrupt (SIGINT is held back until teardown is over) — every
    process inside the hosts is killed and the namespaces, links and guard route are gone. A
    failure while entering tears down whatever was already built. Bad arguments raise
    ``ValueError`` before anything is created.
    """

    def __init__(self, hosts: int | Sequence[str] = 3, *, prefix: str = DEFAULT_PREFIX) -> None:
        _check_prefix(prefix)
        self._names = _host_names(hosts)
        self.prefix = prefix
        self.owner = os.getpid()
        self.stem = f"{prefix}-{self.owner}-{next(_seq)}"
        self.switch_namespace = f"{self.stem}-{_SWITCH}"
        self.subnet: ipaddress.IPv4Network | None = None
        self.hosts: tuple[VirtualHost, ...] = ()
        self._created: list[str] = []

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this instance created (hosts and the switch), in creation order."""
        return list(self._created)

    def __enter__(self) -> VirtualHosts:
        try:
            cleanup_leftovers(self.prefix)
            self.subnet = _reserve_subnet(self.owner)
            self._build(self.subnet)
        except BaseException as exc:
            try:
                self.close()
            except VirtualHostError as err:
                exc.add_note(f"virtual hosts teardown also failed: {err}")
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except VirtualHostError as err:
            if exc is None:
                raise
            exc.add_note(f"virtual hosts teardown also failed: {err}")

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self, subnet: ipaddress.IPv4Network) -> None:
        sw = self.switch_namespace
        self._add_namespace(sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        addresses = list(itertools.islice(subnet.hosts(), len(self._names)))
        hosts = []
        for index, (name, address) in enumerate(zip(self._names, addresses, strict=True)):
            ns = f"{self.stem}-{name}"
            port = f"port{index}"
            self._add_namespace(ns)
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", sw)  # fmt: skip
            _ip("-n", sw, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{address}/{subnet.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            hosts.append(VirtualHost(name=name, namespace=ns, address=str(address)))
        self.hosts = tuple(hosts)

    def close(self) -> None:
        """Kill every process in the hosts, delete namespaces and the guard route (idempotent)."""
        errors: list[str] = []
        with _sigint_deferred():
            for host in self.hosts:
                host._kill_started()
            for name in reversed(self._created):
                try:
                    _kill_namespace(name)
                except (VirtualHostError, OSError, subprocess.TimeoutExpired) as exc:
                    errors.append(str(exc))
            self._created.clear()
            if self.subnet is not None:
                try:
                    _delete_guard(str(self.subnet), self.owner)
                    self.subnet = None
                except (VirtualHostError, OSError, subprocess.TimeoutExpired) as exc:
                    errors.append(str(exc))
        if errors:
            raise VirtualHostError("; ".join(errors))

    def __getitem__(self, key: int | str) -> VirtualHost:
        if isinstance(key, str):
            for host in self.hosts:
                if host.name == key:
                    return host
            raise KeyError(f"no virtual host named {key!r}; hosts: {self._names}")
        return self.hosts[key]

    def __iter__(self) -> Iterator[VirtualHost]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C back until the block ends, then deliver it, so it cannot cut a teardown
    short. (Python handles signals in the main thread only; elsewhere nothing needs holding.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        # None: the old handler was not installed from Python and cannot be put back.
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        if received:
            signal.raise_signal(signal.SIGINT)


# --------------------------------------------------------------------------- services


@dataclass(frozen=True)
class ClusterServices:
    """Where Redis and a Mooncake master (with its HTTP metadata server) listen on one host."""

    address: str
    redis_port: int
    master_port: int
    metadata_port: int
    metrics_port: int

    @property
    def redis_url(self) -> str:
        """``redis://address:port/0``, usable as a ledger URI."""
        return f"redis://{self.address}:{self.redis_port}/0"

    @property
    def mooncake_master(self) -> str:
        """``address:port`` of the master's RPC server (``master_server_addr`` of ``setup``)."""
        return f"{self.address}:{self.master_port}"

    @property
    def mooncake_metadata_url(self) -> str:
        """The HTTP metadata server's URL (``metadata_server`` of ``setup``)."""
        return f"http://{self.address}:{self.metadata_port}/metadata"

    def mooncake_store_uri(self, local_hostname: str, **options: str) -> str:
        """A ``mooncake://`` store URI for a client on ``local_hostname`` using this master and
        its metadata server over TCP; ``options`` are added to the query string as given.
        """
        query = {
            "metadata": self.mooncake_metadata_url,
            "local_hostname": local_hostname,
            "protocol": "tcp",
            **options,
        }
        return f"mooncake://{self.mooncake_master}?{urlencode(query)}"

    def mooncake_setup_args(
        self, local_hostname: str, global_segment_size: int, local_buffer_size: int
    ) -> tuple[str, str, int, int, str, str, str]:
        """Positional arguments of ``MooncakeDistributedStore.setup`` for a client at
        ``local_hostname`` reaching this master over TCP.
        """
        return (
            local_hostname,
            self.mooncake_metadata_url,
            global_segment_size,
            local_buffer_size,
            "tcp",
            "",
            self.mooncake_master,
        )


def _log_tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"


def _stop(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _listening_ports(pid: int) -> set[int]:
    """TCP ports on which process ``pid`` itself holds a listening socket (read from /proc)."""
    try:
        inodes = {
            link[8:-1]
            for fd in os.listdir(f"/proc/{pid}/fd")
            if (link := _readlink(f"/proc/{pid}/fd/{fd}")).startswith("socket:[")
        }
        tables = [Path(f"/proc/{pid}/net/{t}").read_text() for t in ("tcp", "tcp6")]
    except OSError:
        return set()
    ports = set()
    for line in itertools.chain.from_iterable(t.splitlines()[1:] for t in tables):
        fields = line.split()
        # local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 is the socket inode.
        if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _start_service(
    host: VirtualHost,
    name: str,
    argv: list[str],
    ports: Sequence[int],
    log_dir: Path,
    timeout: float,
) -> subprocess.Popen[Any]:
    """Start ``argv`` on ``host`` (output to ``log_dir/name.log``); return once the process
    itself listens on every port in ``ports`` (another process on the port does not count).
    """
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        proc = host.popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=log_dir
        )
    deadline = time.monotonic() + timeout
    while True:
        missing = set(ports) - _listening_ports(proc.pid)
        if proc.poll() is not None:
            problem = f"exited with code {proc.returncode}"
        elif not missing:
            return proc
        elif time.monotonic() >= deadline:
            problem = f"did not listen on port(s) {sorted(missing)} within {timeout:g} s"
        else:
            time.sleep(0.02)
            continue
        _stop(proc)
        raise VirtualHostError(
            f"{name} on host {host.name} ({host.address}) {problem}; log {log}:\n{_log_tail(log)}"
        )


@contextlib.contextmanager
def serve_cluster(
    host: VirtualHost,
    *,
    redis_port: int = 6379,
    master_port: int = 50051,
    metadata_port: int = 8080,
    metrics_port: int = 9003,
    log_dir: Path | None = None,
    timeout: float = 20.0,
) -> Iterator[ClusterServices]:
    """Run redis-server and mooncake_master (HTTP metadata server on) on ``host``; yield where
    they listen once each process itself listens on all its ports; stop both on exit (SIGTERM,
    then SIGKILL after 5 s). A service that fails to start raises :class:`VirtualHostError`
    with the tail of its log. Logs go to ``log_dir`` (a temporary directory, removed on exit,
    when not given).

    Redis and the master's RPC and metrics servers bind the host's address. Mooncake's HTTP
    metadata server binds every interface whatever it is told (mooncake 0.3.13), which inside
    the host's namespace still means this host alone.
    """
    temporary = log_dir is None
    logs = Path(tempfile.mkdtemp(prefix="dft-services-")) if log_dir is None else log_dir
    addr = host.address
    started: list[subprocess.Popen[Any]] = []
    try:
        redis_argv = [
            "redis-server", "--bind", addr, "--port", str(redis_port), "--save", "",
            "--appendonly", "no", "--protected-mode", "no", "--dir", str(logs),
        ]  # fmt: skip
        started.append(
            _start_service(host, "redis-server", redis_argv, [redis_port], logs, timeout)
        )
        master_argv = [
            "mooncake_master",
            f"--rpc_address={addr}",
            f"--rpc_port={master_port}",
            f"--metrics_host={addr}",
            f"--metrics_port={metrics_port}",
            "--enable_http_metadata_server=true",
            f"--http_metadata_server_host={addr}",
            f"--http_metadata_server_port={metadata_port}",
        ]
        ports = [master_port, metadata_port, metrics_port]
        started.append(_start_service(host, "mooncake_master", master_argv, ports, logs, timeout))
        yield ClusterServices(addr, redis_port, master_port, metadata_port, metrics_port)
    finally:
        for proc in reversed(started):
            _stop(proc)
        if temporary:
            shutil.rmtree(logs, ignore_errors=True)


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``check``: print whether multi-host tests can run here (exit 0) or ``NOT RUN: reason``
    (exit 3). ``cleanup [PREFIX]``: remove leftovers of crashed runs and list them.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["check"] and len(args) == 1:
        ok, reason = multihost_available()
        print(f"available: {reason}" if ok else f"NOT RUN: {reason}")
        return 0 if ok else 3
    if args[:1] == ["cleanup"] and len(args) <= 2:
        try:
            removed = cleanup_leftovers(*args[1:])
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for item in removed:
            print(f"removed {item}")
        return 0
    print("usage: python -m dataflow_testing.netns check | cleanup [PREFIX]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
