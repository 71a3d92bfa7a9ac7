"""Helpers for the run-level tests (unique module name: tests dirs share sys.path)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dataflow_testing.launch import TINY_JOB, console_script

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples"

TINY_RUN = [
    *TINY_JOB,
    "trainer.checkpoint_every=0",
    "flow.high_watermark=16",
    "flow.low_watermark=8",
]
"""Overrides that shrink any example config to a seconds-long run."""


def script() -> Path:
    """The installed ``dataflow-launch`` console script (the real entry point)."""
    try:
        return console_script()
    except RuntimeError as exc:
        pytest.fail(str(exc))


def cli(
    *args: str, timeout: float = 240, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``dataflow-launch ARGS`` to completion."""
    return subprocess.run(
        [str(script()), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


def start_logged(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``args`` in a new session, stdout and stderr into ``log`` (a role run by hand)."""
    with log.open("wb") as fh:
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def start_cli(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """Start ``dataflow-launch ARGS --no-progress`` with :func:`start_logged`."""
    return start_logged([str(script()), *args, "--no-progress"], log)


def torchrun_cli(nproc: int, *args: str) -> list[str]:
    """The command line of ``dataflow-launch ARGS --no-progress`` under ``torchrun
    --standalone --nproc-per-node NPROC`` (this interpreter's torch).
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "dataflow.launch.cli",
        *args,
        "--no-progress",
    ]


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    children = [int(p) for p in out.stdout.split()]
    return [d for c in children for d in (c, *_descendants(c))]


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` and every process below it, as a host failure would, and reap it.

    Walks the process tree rather than the process group: torchrun starts its workers in
    sessions of their own, so a kill of torchrun's group would leave them running.
    """
    for pid in (proc.pid, *_descendants(proc.pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def sets(*items: str) -> list[str]:
    """``--set`` arguments for each item."""
    out: list[str] = []
    for item in items:
        out += ["--set", item]
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trained_ids(run_dir: Path) -> list[str]:
    """Every sample id in ``trained.jsonl``, in order (duplicates kept)."""
    return [sid for row in read_jsonl(run_dir / "trained.jsonl") for sid in row["sample_ids"]]


def assert_one_error_line(
    result: subprocess.CompletedProcess[str], command: str, *needles: str
) -> str:
    """Exit status 2, exactly one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith(f"dataflow-launch {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


SHM_ROOT = Path("/dev/shm")


def shm_segments(store_name: str) -> list[Path]:
    """The shared-memory files an ``shm://<store_name>`` store holds right now."""
    return sorted(SHM_ROOT.glob(f"dfs~{store_name}~*"))


@contextlib.contextmanager
def fresh_shm_name() -> Iterator[str]:
    """A unique ``shm://`` store name; whatever a failed test left under it is removed."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        for path in shm_segments(name):
            path.unlink(missing_ok=True)
