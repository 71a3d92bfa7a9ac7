"""Running a real disaggregated online job for the gates, and auditing it afterwards.

A job is the `dataflow-launch produce` and `dataflow-launch consume` commands (real processes:
the built-in hf target at a tiny size, the real trainer, a SQLite or Redis ledger, a `shm://`
store). The audit reads only what a run leaves behind: `trained.jsonl`, the ledger's status and
refs, and `/dev/shm`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dataflow_testing.launch import TINY_JOB, console_script

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "disaggregated_online.yaml"
SHM_ROOT = Path("/dev/shm")
SHM_PREFIX = "dfs~"  # dataflow.store.shm.PREFIX: segments are dfs~<store>~<sample>~<generation>

SUMMARY: list[str] = []
"""Lines the gate tests add; the conftest prints them after the session."""


def gate_variant() -> str:
    """`ci` (default) or `long` (`DATAFLOW_GATE_VARIANT=long`, set by the *-long sessions)."""
    variant = os.environ.get("DATAFLOW_GATE_VARIANT", "ci")
    if variant not in ("ci", "long"):
        raise ValueError(f"DATAFLOW_GATE_VARIANT must be ci or long, got {variant!r}")
    return variant


TINY = (*TINY_JOB, "producer.workers=1")
"""Overrides that shrink the example to a seconds-long job (windows of 2 samples)."""


def launcher() -> str:
    """The installed `dataflow-launch` console script next to this interpreter."""
    return str(console_script())


@dataclass(frozen=True)
class Job:
    """One run's placement and size: its directory, store name, ledger URI and prompt count."""

    root: Path
    prompts: int
    ledger_uri: str = ""
    run_id: str = "gate"
    store_name: str = field(default_factory=lambda: f"gate-{uuid.uuid4().hex[:10]}")
    extra: tuple[str, ...] = ()
    store_query: str = ""  # e.g. "?arena_bytes=0": one segment per sample, no arena

    @property
    def ledger(self) -> str:
        return self.ledger_uri or f"sqlite://{self.root / 'ledger.sqlite'}"

    @property
    def store_uri(self) -> str:
        return f"shm://{self.store_name}{self.store_query}"

    @property
    def trained_log(self) -> Path:
        return self.root / "trained.jsonl"

    def overrides(self) -> list[str]:
        items = [
            *TINY,
            f"run.id={self.run_id}",
            f"run.out_dir={self.root}",
            f"store.uri={self.store_uri}",
            f"ledger.uri={self.ledger}",
            f"data.max_prompts={self.prompts}",
            *self.extra,
        ]
        return [arg for item in items for arg in ("--set", item)]

    def sample_ids(self, passes: int = 1) -> list[str]:
        """Every sample the job must account for (sample id = task id `<run>-p<pass>-<i>`)."""
        return [f"{self.run_id}-p{p}-{i}" for p in range(passes) for i in range(self.prompts)]


class Role:
    """A role process with its output in `<root>/logs/<name>.log` (own session, so a SIGKILL
    reaches only it)."""

    def __init__(self, job: Job, name: str, argv: Sequence[str]) -> None:
        self.name = name
        self.log = job.root / "logs" / f"{name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def poll(self) -> int | None:
        return self.process.poll()

    def kill(self) -> bool:
        """SIGKILL this process (only it, by pid); True if it was still running."""
        if self.process.poll() is not None:
            return False
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        return True

    def wait(self, timeout: float) -> int:
        """Exit status; a process still running after ``timeout`` is killed and reported."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} hung for {timeout}s; log:\n{self.output()}"
            ) from None

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _launch(job: Job, command: str, *args: str) -> list[str]:
    return [launcher(), command, str(EXAMPLE), *job.overrides(), "--no-progress", *args]


def producer(job: Job, name: str = "producer") -> Role:
    """`dataflow-launch produce` for ``job``."""
    return Role(job, name, _launch(job, "produce"))


def consumer(job: Job, name: str = "consumer", *, resume: bool = False) -> Role:
    """`dataflow-launch consume [--resume]` for ``job``."""
    return Role(job, name, _launch(job, "consume", *(["--resume"] if resume else [])))


def trained_steps(path: Path) -> list[tuple[int, list[str]]]:
    """The complete lines of `trained.jsonl` (a torn last line is not one)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.endswith("\n"):
            row = json.loads(line)
            rows.append((int(row["step"]), list(row["sample_ids"])))
    return rows


def shm_segments(store_name: str) -> list[Path]:
    """Every file of our store in /dev/shm: segments, temporaries and the arena file.

    For "nothing left" checks: a finished run leaves none of them (an arena left behind, even
    with no run in use, would keep the memory of every slab it ever used).
    """
    return sorted(SHM_ROOT.glob(f"{SHM_PREFIX}{store_name}~*"))


def shm_samples(store_name: str) -> int:
    """Samples of our store in /dev/shm now: published segments plus LIVE arena runs."""
    from dataflow.store.usage import shm_usage

    return shm_usage(store_name, str(SHM_ROOT)).samples


def shm_bytes(store_name: str) -> int:
    """Bytes our store holds in /dev/shm now: segment files plus the arena's runs in use (the
    samples' bytes, not the arena file's size)."""
    from dataflow.store.usage import shm_usage

    return shm_usage(store_name, str(SHM_ROOT)).bytes_in_use


def ledger_status(uri: str):  # -> LedgerStatus
    from dataflow.control import open_ledger

    ledger = open_ledger(uri)
    try:
        return ledger.status()
    finally:
        ledger.close()


@dataclass(frozen=True)
class Audit:
    """What a finished job accounted for."""

    trained: int
    dropped: int
    steps: int


def audit_job(job: Job, quantum: int = 2, passes: int = 1) -> Audit:
    """Assert the exactly-once invariants of a finished job; return its tallies.

    By `trained.jsonl`: steps 1..S contiguous, one window each, no sample twice. By the ledger:
    every expected sample is known (none lost), trained ones RELEASED, the rest DROPPED with a
    reason (only the sub-window tail), nothing in flight, prompts all DONE, producer CLOSED and
    consumer DONE. By the store: no segment, arena run or arena file of ours left in /dev/shm,
    a fresh store's health at the baseline.
    """
    from dataflow.control import open_ledger
    from dataflow.store import open_store

    rows = trained_steps(job.trained_log)
    assert [s for s, _ in rows] == list(range(1, len(rows) + 1)), f"steps: {[s for s, _ in rows]}"
    assert all(len(ids) == quantum for _, ids in rows), "a step trained other than one window"
    trained = [sid for _, ids in rows for sid in ids]
    duplicates = sorted({sid for sid in trained if trained.count(sid) > 1})
    assert not duplicates, f"trained more than once: {duplicates}"
    expected = job.sample_ids(passes)
    assert set(trained) <= set(expected), sorted(set(trained) - set(expected))
    dropped = set(expected) - set(trained)
    assert len(dropped) < quantum, f"not trained and more than a partial window: {sorted(dropped)}"

    ledger = open_ledger(job.ledger)
    try:
        status = ledger.status()
        known = {ref.sample_id for ref in ledger.refs(expected)}
    finally:
        ledger.close()
    assert known == set(expected), f"lost: {sorted(set(expected) - known)}"
    assert dict(status.samples) == {
        "committed": 0,
        "assigned": 0,
        "trained": 0,
        "released": len(trained),
        "dropped": len(dropped),
    }, dict(status.samples)
    assert dict(status.dropped_reasons) == ({"partial_window": len(dropped)} if dropped else {})
    assert dict(status.prompts).get("done") == len(expected), dict(status.prompts)
    assert status.in_flight == 0 and status.in_flight_bytes == 0
    assert status.markers.producer == "closed", status.markers
    assert status.markers.consumer == "done", status.markers

    from dataflow.store.usage import shm_usage

    usage = shm_usage(job.store_name, str(SHM_ROOT))
    assert usage.runs == (), f"arena runs leaked: {usage.runs}"
    assert usage.empty, f"files leaked in /dev/shm: {list(usage.files)}"
    store = open_store(job.store_uri)
    try:
        health = store.health()
    finally:
        store.close()
    assert (health.resident_samples, health.resident_bytes, health.active_leases) == (0, 0, 0)
    return Audit(trained=len(trained), dropped=len(dropped), steps=len(rows))


def wait_until(predicate, timeout: float, poll: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return bool(predicate())


def expect_clean_exit(role: Role, timeout: float) -> None:
    """``role`` exits 0 within ``timeout`` seconds (killed and reported otherwise)."""
    expect_clean_exits([role], timeout)


def expect_clean_exits(roles: Sequence[Role], timeout: float) -> None:
    """Every role exits 0 within ``timeout`` seconds.

    Roles that depend on each other (a producer held back by a consumer's backpressure) would
    wait for a dead peer until the timeout; so the first role to exit non-zero ends the wait
    at once: the others are killed and every role's log is reported.
    """
    deadline = time.monotonic() + timeout
    while True:
        codes = {role.name: role.poll() for role in roles}
        failed = [name for name, code in codes.items() if code not in (None, 0)]
        running = [name for name, code in codes.items() if code is None]
        if not failed and not running:
            return
        if failed or time.monotonic() >= deadline:
            alive = [role.name for role in roles if role.kill()]
            verdict = (
                f"{', '.join(f'{n} exited {codes[n]}' for n in failed)}"
                if failed
                else f"{', '.join(running)} hung for {timeout:.0f}s"
            )
            logs = "\n".join(f"--- {role.name} log:\n{role.output()}" for role in roles)
            raise AssertionError(f"{verdict} (killed: {alive or 'none'})\n{logs}")
        time.sleep(0.2)


def one_error_line(role: Role, command: str) -> str:
    """The single `dataflow-launch COMMAND: error: …` line a refused command printed."""
    lines = [ln for ln in role.output().splitlines() if ln.startswith(f"dataflow-launch {command}")]
    assert lines, f"{role.name}: no error line; log:\n{role.output()}"
    assert "Traceback" not in role.output(), role.output()
    return lines[-1]


def cleanup_segments(names: Sequence[str]) -> None:
    """Remove segments of stores a failed test left behind (only ours, by store name)."""
    for name in names:
        for path in shm_segments(name):
            path.unlink(missing_ok=True)
