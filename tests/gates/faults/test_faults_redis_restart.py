"""Redis restarted in the middle of a run: a clear failure or a clean recovery, never silent
loss or duplication.

A real `redis-server` (AOF, `appendfsync always`, so an acknowledged write survives a restart)
holds the ledger of a real disaggregated online run (`produce` + `consume`, `shm://` store).
After a few optimizer steps the server is stopped and started again on the same port and data
directory. Each role either carries on, or exits with one clear error line; a role that failed
is started again on the same ledger (`consume --resume`, `produce`). The finished run must then
pass the exactly-once audit.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dataflow_testing.ports import free_port, wait_for_port
from gate_runs import (
    Job,
    Role,
    audit_job,
    cleanup_segments,
    consumer,
    expect_clean_exit,
    producer,
    trained_steps,
    wait_until,
)

pytestmark = pytest.mark.redis


class RestartableRedis:
    """A redis-server on a fixed port and data directory that can be stopped and restarted."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: apt-get install -y redis-server")
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
            str(self.workdir), "--save", "", "--appendonly", "yes", "--appendfsync", "always",
        ]  # fmt: skip
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if not wait_for_port("127.0.0.1", self.port, 15.0):
            raise RuntimeError(f"redis-server did not listen on {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis fsyncs the AOF and exits
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.process = None

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0?namespace=gate"


@contextmanager
def restartable_redis(workdir: Path) -> Iterator[RestartableRedis]:
    server = RestartableRedis(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_redis_restart_mid_run_fails_clearly_or_recovers_exactly_once(tmp_path, summary):
    (tmp_path / "redis").mkdir()
    with restartable_redis(tmp_path / "redis") as redis:
        job = Job(tmp_path / "run", 15, ledger_uri=redis.url())
        roles: dict[str, Role] = {"producer": producer(job), "consumer": consumer(job)}
        outcomes: list[str] = []
        try:
            started = wait_until(
                lambda: (
                    len(trained_steps(job.trained_log)) >= 2 or roles["consumer"].poll() is not None
                ),
                300,
            )
            assert started and roles["consumer"].poll() is None, roles["consumer"].output()
            redis.stop()
            time.sleep(1.0)
            redis.start()
            for attempt in range(3):
                for name in ("producer", "consumer"):
                    code = roles[name].wait(300)
                    if code == 0:
                        continue
                    lines = [ln for ln in roles[name].output().splitlines() if "error:" in ln]
                    assert code == 2 and lines, f"{name} failed unclearly:\n{roles[name].output()}"
                    outcomes.append(f"{name} exited {code}: {lines[-1][:140]}")
                    again = f"{name}-r{attempt + 1}"
                    roles[name] = (
                        consumer(job, again, resume=True)
                        if name == "consumer"
                        else producer(job, again)
                    )
                if all(r.poll() == 0 for r in roles.values()):
                    break
            for role in roles.values():
                expect_clean_exit(role, 300)
            result = audit_job(job)
        finally:
            for role in roles.values():
                role.kill()
            cleanup_segments([job.store_name])  # after a failed run: the audit already reported
    how = "; ".join(outcomes) if outcomes else "both roles carried on (clean recovery)"
    summary.append(
        f"faults/redis-restart: {how} -> trained {result.trained} exactly once, dropped "
        f"{result.dropped}, lost 0"
    )
