"""A real ``mooncake_master`` on loopback, for tests of the ``mooncake://`` store.

Fixtures:
- ``mooncake_master`` (session): one master shared by a whole test session.
- ``start_mooncake_master`` (function): a factory for private masters (a short read lease, a
  master to SIGKILL); every master it started is stopped at the end of the test.

The master is started without its HTTP metadata server unless asked: clients use Mooncake's
``P2PHANDSHAKE`` metadata, and the HTTP metadata server binds every interface whatever
``--http_metadata_server_host`` says (measured on mooncake-transfer-engine-non-cuda 0.3.13).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dataflow_testing.ports import free_port, wait_for_port

HOST = "127.0.0.1"
_START_ATTEMPTS = 3


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL the master if the test process dies (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def master_binary() -> str:
    """Path of the ``mooncake_master`` executable shipped in the ``mooncake`` wheel.

    The wheel's own ELF binary is preferred over its console-script wrapper, so the process we
    start (and later stop) is the master itself. Raises ``FileNotFoundError`` naming the fix.
    """
    spec = importlib.util.find_spec("mooncake")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / "mooncake_master"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("mooncake_master")
    if found:
        return found
    raise FileNotFoundError(
        "mooncake_master not found: install the store's test extras "
        "(pip install -e 'packages/dataflow-store[test,mooncake-cpu]' -c constraints.txt)"
    )


class MooncakeMaster:
    """One running ``mooncake_master`` bound to 127.0.0.1 on free ports.

    Guarantees: when the constructor returns, the master accepts RPC connections on
    ``rpc_port``; ``stop()`` (SIGTERM, then SIGKILL after ``grace_s``) and ``kill()`` (SIGKILL)
    are idempotent and leave no process behind.
    """

    def __init__(
        self,
        *,
        lease_ttl_ms: int | None = None,
        http_metadata: bool = False,
        extra_args: tuple[str, ...] = (),
        ready_timeout_s: float = 20.0,
    ) -> None:
        self.host = HOST
        self._log_dir = tempfile.mkdtemp(prefix="mooncake-master-")
        self.log_path = Path(self._log_dir) / "master.log"
        last_error = ""
        for _ in range(_START_ATTEMPTS):
            self.rpc_port = free_port(HOST)
            self.metrics_port = free_port(HOST)
            self.http_metadata_port = free_port(HOST) if http_metadata else None
            args = self._args(lease_ttl_ms, extra_args)
            self._argv = args
            with open(self.log_path, "wb") as log:
                self._proc = self._spawn(log)
            if wait_for_port(HOST, self.rpc_port, ready_timeout_s) and self._proc.poll() is None:
                return
            last_error = self.log_tail()
            self.kill()  # a port taken meanwhile, or a slow start: retry on fresh ports
        raise RuntimeError(f"mooncake_master did not start on {HOST}:\n{last_error}")

    def _spawn(self, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self._argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def restart(self, ready_timeout_s: float = 20.0) -> None:
        """SIGKILL the master and start a new one on the same ports and flags, as a crashed
        master brought back: whatever the old one kept in memory is gone. Raises
        ``RuntimeError`` (with the log's tail) when it does not accept connections in time.
        """
        self.kill()
        with open(self.log_path, "ab") as log:
            self._proc = self._spawn(log)
        if not (wait_for_port(HOST, self.rpc_port, ready_timeout_s) and self.alive):
            raise RuntimeError(
                f"mooncake_master did not restart on {self.address}:\n{self.log_tail()}"
            )

    def _args(self, lease_ttl_ms: int | None, extra_args: tuple[str, ...]) -> list[str]:
        args = [
            master_binary(),
            f"--rpc_address={HOST}",
            f"--rpc_port={self.rpc_port}",
            f"--metrics_host={HOST}",
            f"--metrics_port={self.metrics_port}",
        ]
        if self.http_metadata_port is not None:
            args += [
                "--enable_http_metadata_server=true",
                f"--http_metadata_server_host={HOST}",
                f"--http_metadata_server_port={self.http_metadata_port}",
            ]
        if lease_ttl_ms is not None:
            args.append(f"--default_kv_lease_ttl={int(lease_ttl_ms)}")
        return args + list(extra_args)

    @property
    def pid(self) -> int:
        """The master's process id."""
        return self._proc.pid

    @property
    def address(self) -> str:
        """``host:port`` of the master's RPC service (Mooncake's ``master_server_addr``)."""
        return f"{self.host}:{self.rpc_port}"

    @property
    def uri(self) -> str:
        """The store URI pointing at this master: ``mooncake://127.0.0.1:PORT``."""
        return f"mooncake://{self.address}"

    @property
    def metadata_server(self) -> str:
        """What clients pass as ``metadata_server``: the HTTP URL if enabled, else P2P handshake."""
        if self.http_metadata_port is None:
            return "P2PHANDSHAKE"
        return f"http://{self.host}:{self.http_metadata_port}/metadata"

    @property
    def alive(self) -> bool:
        """Whether the master process is still running."""
        return self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the master's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the master (a crash, for fault tests) and reap it."""
        if self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGKILL)
        self._proc.wait()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the master: SIGTERM, then SIGKILL if it has not exited after ``grace_s``."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._proc.wait()
        shutil.rmtree(self._log_dir, ignore_errors=True)

    def __repr__(self) -> str:
        state = "alive" if self.alive else "stopped"
        return f"MooncakeMaster({self.address}, pid={self.pid}, {state})"


@pytest.fixture(scope="session")
def mooncake_master() -> Iterator[MooncakeMaster]:
    """A ``mooncake_master`` on loopback shared by the session (default 10 s read lease)."""
    master = MooncakeMaster()
    try:
        yield master
    finally:
        master.stop()


class MasterFactory:
    """Starts private masters for one test and stops them all at its end."""

    def __init__(self) -> None:
        self._started: list[MooncakeMaster] = []

    def __call__(
        self,
        *,
        lease_ttl_ms: int | None = None,
        http_metadata: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> MooncakeMaster:
        master = MooncakeMaster(
            lease_ttl_ms=lease_ttl_ms, http_metadata=http_metadata, extra_args=extra_args
        )
        self._started.append(master)
        return master

    def stop_all(self) -> None:
        """Stop every master this factory started (idempotent)."""
        for master in self._started:
            master.stop()
        self._started.clear()


@pytest.fixture
def start_mooncake_master() -> Iterator[MasterFactory]:
    """A factory for private masters (``start_mooncake_master(lease_ttl_ms=500)``)."""
    factory = MasterFactory()
    try:
        yield factory
    finally:
        factory.stop_all()


__all__ = [
    "MasterFactory",
    "MooncakeMaster",
    "master_binary",
    "mooncake_master",
    "start_mooncake_master",
]
