"""Stop signals and parent death for ``dataflow-launch run`` (real processes, real signals).

``SIGTERM`` / ``SIGHUP`` to ``run`` stop it the way Ctrl-C does: every role stopped, exit status
``128 + signal``, a state ``--resume`` completes with every sample trained exactly once and every
feature freed. ``SIGKILL`` of ``run`` (nothing can be handled) still leaves no role behind: each
role follows its supervisor and stops by itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from run_helpers import (
    EXAMPLES,
    TINY_RUN,
    cli,
    fresh_shm_name,
    script,
    sets,
    shm_segments,
    trained_ids,
)

PROMPTS = 24
SIGNAL_AFTER_LINES = 2


def _roles_of(supervisor: int) -> list[int]:
    """Pids of live processes started by the ``run`` process ``supervisor`` (its roles and
    their torchrun ranks), found by the ``DATAFLOW_SUPERVISOR_PID`` they inherit.
    """
    marker = f"DATAFLOW_SUPERVISOR_PID={supervisor}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in environ and state != "Z":
            pids.append(int(proc.name))
    return pids


def _wait_no_roles(supervisor: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := _roles_of(supervisor)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _overrides(out: Path, shm_name: str) -> list[str]:
    return sets(
        *TINY_RUN,
        "run.id=sig",
        f"run.out_dir={out}",
        f"data.max_prompts={PROMPTS}",
        "data.max_length=64",
        "trainer.ttt_length=4",
        "trainer.checkpoint_every=2",
        "producer.workers=1",
        f"store.uri=shm://{shm_name}",
        f"ledger.uri=sqlite://{out}/ledger.sqlite",
    )


def _start_run(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(
            [str(script()), "run", *args, "--no-progress"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_trained(run: subprocess.Popen[bytes], out: Path, log: Path) -> None:
    deadline = time.monotonic() + 180
    while _lines(out / "trained.jsonl") < SIGNAL_AFTER_LINES:
        assert run.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)


def _kill_everything(run: subprocess.Popen[bytes]) -> None:
    for pid in [run.pid, *_roles_of(run.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if run.poll() is None:
        run.wait()


def _resume_and_check(config: str, overrides: list[str], out: Path, shm_name: str) -> None:
    resumed = cli("run", config, *overrides, "--resume", "--no-progress", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ids = trained_ids(out)
    assert len(ids) == len(set(ids)) == PROMPTS  # each sample exactly once, none lost
    assert sorted(ids) == sorted(f"sig-p0-{i}" for i in range(PROMPTS))
    assert shm_segments(shm_name) == []  # every feature freed, the stopped run's included


def _job(tmp_path: Path, shm_name: str) -> tuple[Path, list[str], str, Path]:
    """The run directory, overrides, config and log path of one signal test's job."""
    out = tmp_path / "run"
    return (
        out,
        _overrides(out, shm_name),
        str(EXAMPLES / "disaggregated_online.yaml"),
        tmp_path / "run.log",
    )


def _start_run_with_roles(args: list[str], out: Path, log: Path) -> subprocess.Popen:
    """Start ``run`` and return once it trained something with producer and consumer running."""
    run = _start_run(args, log)
    try:
        _wait_trained(run, out, log)
        roles = _roles_of(run.pid)
        assert len(roles) >= 2, roles  # the producer and the consumer are running
    except BaseException:
        _kill_everything(run)
        raise
    return run


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_stop_signal_to_run_stops_every_role_and_resume_completes(tmp_path, signum, status):
    with fresh_shm_name() as shm_name:
        out, overrides, config, log = _job(tmp_path, shm_name)
        run = _start_run_with_roles([config, *overrides], out, log)
        try:
            run.send_signal(signum)
            assert run.wait(timeout=120) == status, log.read_text()[-3000:]
            assert _roles_of(run.pid) == []  # no role outlived run
            text = log.read_text()
            assert f"dataflow-launch run: interrupted by {signal.Signals(signum).name}" in text
            assert _lines(out / "trained.jsonl") < PROMPTS // 2, "finished before the signal"
        finally:
            _kill_everything(run)
        _resume_and_check(config, overrides, out, shm_name)


def test_sigkill_of_run_stops_its_roles_by_themselves(tmp_path):
    with fresh_shm_name() as shm_name:
        out, overrides, config, log = _job(tmp_path, shm_name)
        run = _start_run_with_roles([config, *overrides], out, log)
        try:
            run.kill()
            run.wait()
            left = _wait_no_roles(run.pid, timeout_s=60)
            assert left == [], f"roles {left} kept running after their run was SIGKILLed"
        finally:
            _kill_everything(run)
        _resume_and_check(config, overrides, out, shm_name)
