"""``dataflow-launch status``: the installed entry point, run as a real process, on real ledgers.

The ledgers are real: an SQLite file and a redis-server database, each populated through
dataflow.control's public API (controller, producer and consumer sides).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from dataflow_testing import factories
from dataflow_testing.launch import console_script
from dataflow_testing.ports import free_port

from dataflow.contracts import PromptTask, SampleRef
from dataflow.control import open_ledger
from dataflow.control.controller import Controller
from dataflow.control.window import WindowShape
from dataflow.launch.cli.status_view import status_record

_namespaces = itertools.count()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed ``dataflow-launch`` console script (the real entry point)."""
    return subprocess.run(
        [str(console_script()), *args], capture_output=True, text=True, timeout=60, check=False
    )


def ref(i: int, *, task: str | None = None) -> SampleRef:
    return factories.make_ref(
        i,
        width=0,
        store_uri="shm://run-a",
        generation=0,
        nbytes=1000 * (i + 1),
        source_task_id=task,
    )


def populate(uri: str) -> dict:
    """Drive a run part way through the public API; return the status the API itself reports.

    Final state: s0,s1 released (step 0, durable); s2,s3 trained (step 1); s4,s5 assigned;
    s6 dropped as stale; s7 committed. Prompts: t0..t5 done, t6 failed, t7 leased, t8 pending.
    """
    ledger = open_ledger(uri)
    try:
        controller = Controller(ledger)
        consumer = controller.consumer(WindowShape(1, 2))
        consumer.open("run-a")
        side = controller.producer()
        side.open("run-a", resume=True)
        side.ingest([PromptTask(f"t{i}", {"input_ids": [1, 2, 3]}) for i in range(9)])
        tasks = side.lease("worker-0", 8, 600)
        side.commit([ref(i, task=tasks[i].task_id) for i in range(6)])
        side.fail_prompt(tasks[6].task_id, "worker-0", "target OOM", retryable=False)
        queue = consumer.queue()
        for step in (0, 1):
            consumer.ack(step, [queue.get(timeout=5).sample_id for _ in range(2)])
            if step == 0:
                consumer.checkpoint_durable(0)
        assert [queue.get(timeout=5).sample_id for _ in range(2)] == ["s4", "s5"]
        side.commit([ref(6), ref(7)])
        ledger.drop(["s6"], "stale_draft")
        return status_record(uri, ledger.status())
    finally:
        ledger.close()


EXPECTED_COUNTS = {
    "samples": {"committed": 1, "assigned": 2, "trained": 2, "released": 2, "dropped": 1},
    "prompts": {"pending": 1, "leased": 1, "done": 6, "failed": 1},
    "dropped_reasons": {"stale_draft": 1},
    "backlog": 1,
    "in_flight": 3,
    "in_flight_bytes": 5000 + 6000 + 8000,  # s4, s5 assigned; s7 committed
    "quantum": 2,
    "durable_step": 0,
    "trained_step": 1,
    "released_through": 0,
    "producer": "running",
    "producer_reason": "",
    "consumer": "running",
    "consumer_reason": "",
    "run_id": "run-a",
    "drift": {"mean": None, "max": None},
}


def sqlite(path: Path) -> str:
    """``sqlite:///abs/path`` for an absolute path."""
    return f"sqlite://{path}"


@pytest.fixture
def sqlite_uri(tmp_path) -> str:
    return sqlite(tmp_path / "ledger.sqlite")


def _check_json(uri: str, backend: str) -> None:
    from_api = populate(uri)
    result = cli("status", uri, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    shown = json.loads(result.stdout)
    assert shown == from_api  # exactly what the ledger's status() says
    assert {k: shown[k] for k in EXPECTED_COUNTS} == EXPECTED_COUNTS
    assert (shown["ledger"], shown["backend"], shown["durable"]) == (uri, backend, True)


def test_json_on_a_sqlite_ledger(sqlite_uri):
    _check_json(sqlite_uri, "sqlite")


@pytest.mark.redis
def test_json_on_a_redis_ledger(redis_server):
    uri = redis_server.url(db=0, namespace=f"cli-status-{next(_namespaces)}")
    _check_json(uri, "redis")


def counts_table(out: str, first_column: str) -> dict[str, int]:
    """A printed one-row counts table (header line, then the first line of numbers) as a dict."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if first_column in line)
    names = re.findall(r"[a-z_]+", lines[header])
    numbers = next(
        re.findall(r"\d+", line) for line in lines[header + 1 :] if re.search(r"\d", line)
    )
    return dict(zip(names, map(int, numbers), strict=True))


def test_table_on_a_sqlite_ledger(sqlite_uri):
    populate(sqlite_uri)
    result = cli("status", sqlite_uri)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.splitlines()[0] == f"ledger {sqlite_uri} (sqlite, durable), run run-a"
    assert counts_table(out, "committed") == EXPECTED_COUNTS["samples"]
    assert counts_table(out, "pending") == EXPECTED_COUNTS["prompts"]
    for name, value in [
        ("producer", "running"),
        ("consumer", "running"),
        ("quantum", "2"),
        ("durable_step", "0"),
        ("trained_step", "1"),
        ("in_flight", "3"),
        ("in_flight_bytes", r"18\.6 KiB \(19000 B\)"),
        ("dropped reasons", "stale_draft=1"),
        ("drift", "not tracked by the ledger"),
    ]:
        assert re.search(rf"\W {re.escape(name)}\s+\W\s+{value}\s+\W", out), (name, out)


def test_a_failed_producer_shows_its_reason(sqlite_uri):
    ledger = open_ledger(sqlite_uri)
    try:
        controller = Controller(ledger)
        controller.consumer(WindowShape(1, 1)).open("run-b")
        side = controller.producer()
        side.open("run-b", resume=True)
        side.fail("all 2 producer workers failed ([w0] CUDA OOM)")
    finally:
        ledger.close()
    shown = json.loads(cli("status", sqlite_uri, "--json").stdout)
    assert (shown["producer"], shown["producer_reason"]) == (
        "failed",
        "all 2 producer workers failed ([w0] CUDA OOM)",
    )
    table = cli("status", sqlite_uri).stdout
    assert re.search(
        r"producer\s+\W\s+failed \(all 2 producer workers failed \(\[w0\] CUDA OOM\)\)", table
    ), table


# -- refusals: one line on stderr, exit 2, nothing created or changed ------------------------


def _assert_refused(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"dataflow-launch status: error: {message}\n"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (
            "postgres://db/ledger",
            "unknown ledger scheme 'postgres' in 'postgres://db/ledger'; expected one of "
            "noop://, memory://, sqlite://, redis://",
        ),
        (
            "memory://",
            "status reads a shared ledger (sqlite:// or redis://), not memory://: a memory:// "
            "ledger lives only inside the process that opened it",
        ),
        (
            "noop://",
            "status reads a shared ledger (sqlite:// or redis://), not noop://: a noop:// "
            "ledger lives only inside the process that opened it",
        ),
    ],
)
def test_wrong_ledger_scheme(uri, message):
    _assert_refused(cli("status", uri), message)


def test_missing_sqlite_file_is_not_created(tmp_path):
    path = tmp_path / "runs" / "ledger.sqlite"
    result = cli("status", sqlite(path), "--json")
    _assert_refused(result, f"no ledger at {path}: the file does not exist")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its directory


def test_empty_sqlite_file_is_left_empty(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.touch()
    _assert_refused(cli("status", sqlite(path)), f"no ledger at {path}: the file is empty")
    assert path.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.sqlite"]


def test_a_file_that_is_not_a_ledger_is_refused_untouched(tmp_path):
    path = tmp_path / "notes.sqlite"
    path.write_bytes(b"not a database\n")
    _assert_refused(
        cli("status", sqlite(path)),
        f"{path} is not an SQLite database (bad header b'not a database\\n'); "
        "refusing to use it as a ledger",
    )
    assert path.read_bytes() == b"not a database\n"


def test_an_sqlite_database_that_is_not_a_ledger_is_refused(tmp_path):
    import sqlite3

    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (x)")
    conn.close()
    _assert_refused(
        cli("status", sqlite(path)),
        f"{path} is an SQLite database but not a dataflow ledger (tables: ['notes'])",
    )


def test_unreachable_redis(tmp_path):
    port = free_port()  # nothing listens there
    result = cli("status", f"redis://127.0.0.1:{port}/0")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"dataflow-launch status: error: open: cannot reach Redis at 127.0.0.1:{port} db 0: "
    )
    assert "Connection refused" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_sqlite_ledger_without_a_run_is_reported(tmp_path):
    path = tmp_path / "ledger.sqlite"
    open_ledger(sqlite(path)).close()  # a ledger file nobody opened a run in
    _assert_refused(
        cli("status", sqlite(path), "--json"),
        f"the ledger at {sqlite(path)} holds no run (no run id, sample or prompt)",
    )


@pytest.mark.redis
def test_a_redis_namespace_without_a_run_is_reported(redis_server):
    uri = redis_server.url(db=0, namespace=f"never-used-{next(_namespaces)}")
    _assert_refused(
        cli("status", uri), f"the ledger at {uri} holds no run (no run id, sample or prompt)"
    )


# -- help ------------------------------------------------------------------------------------


def test_top_level_help_names_the_commands():
    for args in ([], ["--help"]):
        result = cli(*args)
        assert result.returncode == 0
        for command in ("demo", "run", "produce", "consume", "status", "export"):
            assert re.search(rf"^\s+{command}\s+\S", result.stdout, re.M), command
        assert re.search(r"^\s+status\s+show a run's ledger", result.stdout, re.M)


def test_status_help():
    result = cli("status", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: dataflow-launch status [-h] [--json] LEDGER_URI")
    assert "a missing SQLite file is an error, never\ncreated" in result.stdout


def test_status_usage_error_exits_2():
    result = cli("status")
    assert result.returncode == 2
    assert "the following arguments are required: LEDGER_URI" in result.stderr


def test_a_reader_closing_the_pipe_ends_status_quietly(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = open_ledger(f"sqlite://{path}")
    ledger.open_run("piped", 2, resume=False)
    ledger.close()
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` exiting before the first write
    try:
        done = subprocess.run(
            [str(console_script()), "status", f"sqlite://{path}", "--json"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
