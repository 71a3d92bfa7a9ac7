"""Config-level problems are refused before anything is created or changed (issue 18 item 5):
one error line naming the problem and the numbers, no run directory, no file changed, no
process or shm segment left.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import pytest
from run_helpers import EXAMPLES, TINY_RUN, assert_one_error_line, cli, sets

ONLINE = EXAMPLES / "disaggregated_online.yaml"
OFFLINE = EXAMPLES / "disaggregated_offline.yaml"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _run(tmp_path: Path, *overrides: str, command: str = "run", config: Path = ONLINE, cwd=None):
    out = tmp_path / "run"
    result = cli(
        command,
        config,
        *sets(*TINY_RUN, f"run.out_dir={out}", *overrides),
        timeout=90,
        cwd=cwd,
    )
    return result, out


def _prompts(tmp_path: Path, count: int) -> Path:
    line = {
        "conversations": [
            {"from": "human", "value": "hello there"},
            {"from": "gpt", "value": "general kenobi"},
        ]
    }
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for _ in range(count)))
    return path


def test_more_ranks_than_the_host_has_are_refused_with_the_numbers(tmp_path):
    cores = len(os.sched_getaffinity(0))
    shm_before = sorted(Path("/dev/shm").glob("dfs~*"))
    result, out = _run(tmp_path, "trainer.dp_size=1000", "flow.high_watermark=4000")
    line = assert_one_error_line(result, "run", "1000", "trainer ranks", f"{cores} CPU cores")
    assert "trainer.dp_size" in line
    assert not out.exists()
    assert sorted(Path("/dev/shm").glob("dfs~*")) == shm_before


def test_consume_outside_torchrun_with_two_ranks_creates_no_run_dir(tmp_path):
    result, out = _run(tmp_path, "trainer.dp_size=2", command="consume")
    assert_one_error_line(result, "consume", "2", "torchrun --nproc-per-node 2")
    assert not out.exists()


@pytest.mark.parametrize("config", [ONLINE, OFFLINE], ids=["online", "offline"])
def test_a_dataset_smaller_than_one_window_says_why(tmp_path, config):
    data = _prompts(tmp_path, 3)
    before = _digest(data)
    result, out = _run(
        tmp_path,
        f"data.path={data}",
        "data.max_prompts=null",
        "trainer.batch_size=4",
        "flow.high_watermark=16",
        config=config,
    )
    assert_one_error_line(result, "run", "larger than the dataset", "3 ", "quantum 4")
    assert not out.exists()
    assert _digest(data) == before


def test_a_relative_dir_store_is_refused_before_anything_starts(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result, out = _run(tmp_path, "store.uri=dir://rel/store", config=OFFLINE, cwd=cwd)
    assert_one_error_line(result, "run", "store.uri", "dir://rel/store", "absolute")
    assert not out.exists()
    assert list(cwd.iterdir()) == []


def test_status_on_a_foreign_sqlite_file_leaves_it_byte_identical(tmp_path):
    foreign = tmp_path / "app.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.execute("INSERT INTO users VALUES ('ann')")
    conn.commit()
    conn.close()
    before = _snapshot(tmp_path)
    result = cli("status", f"sqlite://{foreign}", timeout=60)
    assert_one_error_line(result, "status", "not a dataflow ledger", "users")
    assert _snapshot(tmp_path) == before
    with sqlite3.connect(foreign) as check:
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_status_reads_a_closed_ledger_without_leaving_side_files(tmp_path):
    from dataflow.control.ledger import open_ledger

    path = tmp_path / "ledger.sqlite"
    ledger = open_ledger(f"sqlite://{path}")
    ledger.open_run("run-1", 2, resume=False)
    ledger.close()
    before = _snapshot(tmp_path)
    result = cli("status", f"sqlite://{path}", "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["run_id"] == "run-1"
    assert _snapshot(tmp_path) == before  # no -wal/-shm created, the file untouched


def test_the_default_dir_store_of_a_relative_out_dir_is_absolute(tmp_path, monkeypatch):
    from dataflow.launch.config import load_config

    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["run.topology=disaggregated_offline", "run.out_dir=runs/x"])
    assert config.store.uri == f"dir://{tmp_path}/runs/x/store"
    assert list(tmp_path.iterdir()) == []
