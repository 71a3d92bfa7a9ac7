"""Two real ``dataflow-launch consume`` processes on one run (issue 18 item 4): the second is
refused, naming the first (host, pid), before it touches anything; the first trains every
sample exactly once; no shm segment is left. On a SQLite ledger and on a real redis-server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from run_helpers import (
    EXAMPLES,
    TINY_RUN,
    cli,
    fresh_shm_name,
    sets,
    shm_segments,
    start_cli,
    trained_ids,
)

PROMPTS = 16


def _status(uri: str):  # type: ignore[no-untyped-def]
    from dataflow.control.ledger import open_ledger

    kw = {"read_only": True} if uri.startswith("sqlite://") else {}
    ledger = open_ledger(uri, **kw)
    try:
        return ledger.status()
    finally:
        ledger.close()


def _wait_for_lease(uri: str, holder: subprocess.Popen[bytes], log: Path) -> None:
    from dataflow.control.ledger import open_ledger

    deadline = time.monotonic() + 120
    while True:
        assert holder.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "the first consumer never took the lease"
        path = Path(uri.removeprefix("sqlite://"))
        if uri.startswith("redis://") or path.is_file():
            kw = {"read_only": True} if uri.startswith("sqlite://") else {}
            try:
                ledger = open_ledger(uri, **kw)
            except Exception:  # the file is being created right now
                ledger = None
            if ledger is not None:
                try:
                    if ledger.consumer_lease().pid == holder.pid:
                        return
                finally:
                    ledger.close()
        time.sleep(0.1)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_second_consumer_is_refused_naming_the_first(tmp_path, backend, request):
    out = tmp_path / "run"
    if backend == "sqlite":
        ledger_uri = f"sqlite://{out}/ledger.sqlite"
    else:
        server = request.getfixturevalue("redis_server")
        ledger_uri = server.url(0, namespace=f"fence-{os.getpid()}-{time.time_ns()}")
    with fresh_shm_name() as shm_name:
        overrides = sets(
            *TINY_RUN,
            "run.id=fence",
            f"run.out_dir={out}",
            f"data.max_prompts={PROMPTS}",
            "producer.workers=1",
            f"store.uri=shm://{shm_name}",
            f"ledger.uri={ledger_uri}",
        )
        config = str(EXAMPLES / "disaggregated_online.yaml")
        out.mkdir()
        # The first consumer opens the run and waits for data: no producer yet, so it is
        # certainly still running (and holding its lease) when the second one starts.
        first = start_cli("consume", config, *overrides, log=tmp_path / "consumer.log")
        producer = None
        try:
            _wait_for_lease(ledger_uri, first, tmp_path / "consumer.log")
            config_before = (out / "config.yaml").read_bytes()
            status_before = _status(ledger_uri)
            second = cli("consume", config, *overrides, "--resume", timeout=120)
            assert second.returncode != 0, second.stdout[-2000:]
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
            assert "another consumer holds run 'fence'" in lines[0]
            assert f"host {socket.gethostname()} pid {first.pid}" in lines[0]
            assert (out / "config.yaml").read_bytes() == config_before
            assert _status(ledger_uri) == status_before
            producer = start_cli("produce", config, *overrides, log=tmp_path / "producer.log")
            assert first.wait(timeout=180) == 0, (tmp_path / "consumer.log").read_text()[-3000:]
            assert producer.wait(timeout=60) == 0, (tmp_path / "producer.log").read_text()[-2000:]
        finally:
            for proc in (producer, first):
                if proc is not None and proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        ids = trained_ids(out)
        assert len(ids) == len(set(ids)) == PROMPTS
        assert shm_segments(shm_name) == []
