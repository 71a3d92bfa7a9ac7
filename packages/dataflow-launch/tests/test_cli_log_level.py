"""``--log-level``: the ``dataflow.*`` loggers of a real ``produce`` process, and the level a
child role inherits through ``DATAFLOW_LOG_LEVEL``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from run_helpers import EXAMPLES, TINY_RUN, assert_one_error_line, cli, script, sets

PRODUCER_DEBUG = "DEBUG dataflow.launch.producer.worker"


def _produce(tmp_path: Path, *before: str, env: dict[str, str] | None = None) -> str:
    out = tmp_path / "run"
    args = [
        *before,
        "produce",
        str(EXAMPLES / "disaggregated_online.yaml"),
        "--no-progress",
        *sets(
            *TINY_RUN,
            "run.id=loglevel",
            f"run.out_dir={out}",
            "data.max_prompts=2",
            "producer.workers=1",
            f"store.uri=dir://{out}/store",
            f"ledger.uri=sqlite://{out}/ledger.sqlite",
        ),
    ]
    child_env = {k: v for k, v in os.environ.items() if k != "DATAFLOW_LOG_LEVEL"}
    child_env.update(env or {})
    result = subprocess.run(
        [str(script()), *args], capture_output=True, text=True, timeout=240, env=child_env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "producer closed: 2 samples" in result.stdout
    return result.stderr


def test_debug_shows_the_producer_debug_lines_and_the_default_does_not(tmp_path):
    debug = _produce(tmp_path / "debug", "--log-level", "debug")
    assert f"{PRODUCER_DEBUG}[" in debug and "leased 2 prompt(s)" in debug, debug
    assert "committed 2 ref(s)" in debug, debug
    # info: the run start with its resolved config
    assert "INFO dataflow.launch.cli.jobs[" in debug and "topology: disaggregated_online" in debug
    quiet = _produce(tmp_path / "default")
    assert "DEBUG" not in quiet and "INFO" not in quiet, quiet


def test_a_child_inherits_the_level_from_the_environment(tmp_path):
    # builders/supervise.py starts each role with this process's environment, where
    # --log-level exported DATAFLOW_LOG_LEVEL.
    inherited = _produce(tmp_path, env={"DATAFLOW_LOG_LEVEL": "debug"})
    assert PRODUCER_DEBUG in inherited, inherited


@pytest.mark.parametrize("where", ["flag", "env"])
def test_an_unknown_level_is_refused(tmp_path, where):
    if where == "flag":
        result = cli("--log-level", "loud", "status", "memory://")
        assert result.returncode == 2 and "invalid choice: 'loud'" in result.stderr
        return
    env = {**os.environ, "DATAFLOW_LOG_LEVEL": "loud"}
    result = subprocess.run(
        [str(script()), "status", "memory://"], capture_output=True, text=True, env=env
    )
    assert_one_error_line(result, "status", "'loud'", "DATAFLOW_LOG_LEVEL")
