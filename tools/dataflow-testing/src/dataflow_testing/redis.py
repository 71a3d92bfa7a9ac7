"""A real ``redis-server`` on loopback for tests: started once per session, always stopped.

``redis_server`` (session fixture) runs ``redis-server --port P --bind 127.0.0.1 --save ''
--appendonly no`` in a temporary directory and yields a :class:`RedisServer`; on teardown it
asks the server to stop (SIGTERM), and kills it if it lingers. A missing binary fails the test
with the install command instead of skipping it. Tests keep apart by key namespace or database.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from dataflow_testing.ports import free_port, wait_for_port

__all__ = ["RedisServer", "redis_server", "start_redis_server"]

_START_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class RedisServer:
    """A running server: where it listens and the process that serves it."""

    host: str
    port: int
    process: subprocess.Popen[bytes]

    def url(self, db: int = 0, **options: str) -> str:
        """``redis://host:port/db`` with ``?k=v`` options appended."""
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"redis://{self.host}:{self.port}/{db}" + (f"?{query}" if query else "")


@contextmanager
def start_redis_server(workdir: Path) -> Iterator[RedisServer]:
    """Start a throw-away redis-server (no persistence) and stop it on exit, whatever happens."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: apt-get install -y redis-server")
    port = free_port()
    log = workdir / f"redis-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", str(workdir)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        if not wait_for_port("127.0.0.1", port, _START_TIMEOUT_S):
            raise RuntimeError(
                f"redis-server did not listen on port {port} within {_START_TIMEOUT_S}s; "
                f"log: {log.read_text(errors='replace')[-2000:]}"
            )
        yield RedisServer("127.0.0.1", port, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on loopback for the whole test session."""
    with start_redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server
