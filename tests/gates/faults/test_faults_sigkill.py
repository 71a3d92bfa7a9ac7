"""Seeded random SIGKILLs of a real disaggregated online run, each followed by a restart.

Each run starts `dataflow-launch produce` and `dataflow-launch consume` (built-in hf target at a
tiny size, the real trainer, a SQLite ledger file, a `shm://` store), SIGKILLs the consumer, the
producer or both at a seeded random point (start-up, or after a random amount of progress plus a
random fraction of a step), restarts what was killed on the same ledger (`consume --resume`,
`produce`), and lets the run finish. Then, from `trained.jsonl`, the ledger and /dev/shm: every
committed sample trained exactly once or dropped with a reason, none lost, nothing left in the
store. 5 runs in the CI variant, 20 (with up to three kills each) in the long one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from gate_runs import (
    Job,
    Role,
    audit_job,
    cleanup_segments,
    consumer,
    expect_clean_exits,
    gate_variant,
    ledger_status,
    producer,
    trained_steps,
)

from dataflow.contracts import DataflowError

RUNS = {"ci": 5, "long": 20}[gate_variant()]
MAX_KILLS = {"ci": 1, "long": 3}[gate_variant()]
VICTIMS = ("consumer", "producer", "both")
RUN_TIMEOUT_S = 420.0


@dataclass
class Tally:
    runs: int = 0
    kills: dict[str, int] = field(default_factory=lambda: {"consumer": 0, "producer": 0})
    trained: int = 0
    dropped: int = 0
    seconds: float = 0.0


_TALLY = Tally()


@pytest.fixture(scope="module")
def tally(summary: list[str]) -> Iterator[Tally]:
    yield _TALLY
    summary.append(
        f"faults/sigkill: {_TALLY.runs} runs, kills consumer={_TALLY.kills['consumer']} "
        f"producer={_TALLY.kills['producer']}, samples trained {_TALLY.trained} "
        f"(each exactly once), dropped {_TALLY.dropped} (partial_window), lost 0, "
        f"leaked segments 0, {_TALLY.seconds:.0f}s"
    )


def _progress(victim: str, job: Job) -> int:
    """Consumer: optimizer steps logged; producer: samples the ledger holds (it only grows)."""
    if victim == "producer":
        if not (job.root / "ledger.sqlite").exists():
            return 0
        try:
            return sum(ledger_status(job.ledger).samples.values())
        except DataflowError:  # the producer is creating the file right now
            return 0
    return len(trained_steps(job.trained_log))


def _trigger(victim: str, job: Job, roles: dict[str, Role], rng: random.Random) -> str:
    """Wait for a seeded random point in ``victim``'s life; describe it ('' if it ended first)."""
    # "both" is timed on the producer's progress: it finishes first, so that is when both live.
    kind = "consumer" if victim == "consumer" else "producer"
    watched = roles[kind]
    if rng.random() < 0.25:  # anywhere in start-up: imports, ledger open, reconcile, engine load
        delay = rng.uniform(0.0, 4.0)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            if watched.poll() is not None:
                return ""
            time.sleep(0.02)
        return f"{delay:.2f}s after start"
    target = _progress(kind, job) + rng.randint(1 if kind == "producer" else 0, 4)
    while _progress(kind, job) < target:
        if watched.poll() is not None:
            return ""
        time.sleep(0.02)
    fraction = rng.uniform(0.0, 0.3)
    time.sleep(fraction)
    unit = "samples committed" if kind == "producer" else "steps logged"
    return f"at {target} {unit} +{fraction:.2f}s"


def _kill_and_restart(victim: str, job: Job, roles: dict[str, Role], restarts: int) -> list[str]:
    killed = []
    for role in ("consumer", "producer"):
        if victim in (role, "both") and roles[role].kill():
            killed.append(role)
    for role in killed:
        name = f"{role}-r{restarts}"
        roles[role] = (
            consumer(job, name, resume=True) if role == "consumer" else producer(job, name)
        )
    return killed


@pytest.mark.parametrize("run", range(RUNS))
def test_sigkill_then_restart_trains_every_sample_exactly_once(run, tmp_path, summary, tally):
    rng = random.Random(7000 + run)
    prompts = rng.choice((13, 15, 16, 17))  # odd counts leave a partial window to drop
    job = Job(tmp_path / "run", prompts, extra=("trainer.checkpoint_every=3",))
    started = time.monotonic()
    roles = {"producer": producer(job), "consumer": consumer(job)}
    events: list[str] = []
    kills: list[str] = []
    try:
        for k in range(rng.randint(1, MAX_KILLS)):
            victim = VICTIMS[(run + k) % len(VICTIMS)]
            point = _trigger(victim, job, roles, rng)
            if not point:
                events.append(f"{victim} finished before its kill point")
                continue
            killed = _kill_and_restart(victim, job, roles, k + 1)
            kills.extend(killed)
            events.append(f"killed {'+'.join(killed) or 'nothing (already done)'} {point}")
        remaining = RUN_TIMEOUT_S - (time.monotonic() - started)
        expect_clean_exits([roles["producer"], roles["consumer"]], remaining)
        result = audit_job(job)
    finally:
        for role in roles.values():
            role.kill()
        cleanup_segments([job.store_name])  # after a failed run: the audit already reported
    seconds = time.monotonic() - started
    tally.runs += 1
    for role in kills:
        tally.kills[role] += 1
    tally.trained += result.trained
    tally.dropped += result.dropped
    tally.seconds += seconds
    summary.append(
        f"faults/sigkill run {run} (seed {7000 + run}, {prompts} prompts): {'; '.join(events)}"
        f" -> trained {result.trained} once each in {result.steps} steps, dropped "
        f"{result.dropped}, {seconds:.0f}s"
    )
    assert any(e.startswith("killed") for e in events), f"no kill happened: {events}"
