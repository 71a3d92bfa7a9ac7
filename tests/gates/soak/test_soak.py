"""Soak: a producer much faster than the trainer stays under the byte cap, then drains to zero.

Real processes (`soak_roles.py`: the launch builders' producer with the built-in hf target, and
the real trainer with a delay injected per optimizer step), a SQLite ledger and the real
`shm://` store (its arena on, by default, from the run's byte budget). A monitor thread
samples, every 20 ms, the ledger's in-flight bytes and the bytes our store holds in /dev/shm
(segments plus the sample bytes of the arena's runs in use, `dataflow.store.usage`); every
sample must be at or under the cap.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from gate_runs import (
    EXAMPLE,
    Job,
    Role,
    audit_job,
    cleanup_segments,
    expect_clean_exits,
    gate_variant,
    ledger_status,
    shm_segments,
)

from dataflow.store.usage import shm_usage

ROLES = Path(__file__).with_name("soak_roles.py")
CAP = 160_000  # bytes; one tiny sample is ~10 kB, so the cap holds about 16 samples
HIGH_BYTES, LOW_BYTES = 96_000, 48_000
LONG = gate_variant() == "long"


@dataclass
class Peaks:
    samples: int = 0
    in_flight_bytes: int = 0
    resident_bytes: int = 0
    over_cap: int = 0
    arena_runs: int = 0  # peak samples held in the store's arena
    segments: int = 0  # peak samples held in their own segments (arena off or full)


class Monitor(threading.Thread):
    """Samples the ledger's in-flight bytes and the store's resident bytes until stopped."""

    def __init__(self, job: Job) -> None:
        super().__init__(name="soak-monitor", daemon=True)
        self.job = job
        self.peaks = Peaks()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.wait(0.02):
                usage = shm_usage(self.job.store_name)
                resident = usage.bytes_in_use
                in_flight = 0
                if (self.job.root / "ledger.sqlite").exists():
                    in_flight = ledger_status(self.job.ledger).in_flight_bytes
                p = self.peaks
                p.samples += 1
                p.in_flight_bytes = max(p.in_flight_bytes, in_flight)
                p.resident_bytes = max(p.resident_bytes, resident)
                p.arena_runs = max(p.arena_runs, usage.arena_runs)
                p.segments = max(p.segments, usage.segments)
                p.over_cap += int(in_flight > CAP or resident > CAP)
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def _role(job: Job, role: str, delay: float = 0.0) -> Role:
    argv = [sys.executable, str(ROLES), role, str(EXAMPLE), *job.overrides()]
    return Role(job, role, [*argv, "--step-delay", str(delay)])


def _report(role: Role, tag: str) -> dict:
    for line in role.log.read_text().splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1 :])
    raise AssertionError(f"{role.name} printed no {tag} line:\n{role.output()}")


def soak(tmp_path: Path, prompts: int, passes: int, delay: float) -> tuple[dict, dict, Peaks]:
    job = Job(
        tmp_path / "run",
        prompts,
        extra=(
            f"data.passes={passes}",
            "producer.workers=2",
            "trainer.checkpoint_every=1",  # features are freed once a checkpoint is durable
            "flow.high_watermark=256",
            "flow.low_watermark=128",
            f"flow.high_bytes={HIGH_BYTES}",
            f"flow.low_bytes={LOW_BYTES}",
            f"flow.byte_cap={CAP}",
        ),
    )
    monitor = Monitor(job)
    monitor.start()
    prod, cons = _role(job, "produce"), _role(job, "consume", delay)
    try:
        expect_clean_exits([prod, cons], 900)
        monitor.stop.set()
        monitor.join(10)
        if monitor.error is not None:
            raise monitor.error
        audit_job(job, passes=passes)  # exactly once, nothing in flight, /dev/shm empty
    finally:
        monitor.stop.set()
        prod.kill()
        cons.kill()
        cleanup_segments([job.store_name])  # after a failed run: the audit already reported
    assert shm_segments(job.store_name) == [] and ledger_status(job.ledger).in_flight_bytes == 0
    return _report(prod, "SOAK_FLOW"), _report(cons, "SOAK_TRAIN"), monitor.peaks


def _line(name: str, flow: dict, train: dict, peaks: Peaks, ratio: float) -> str:
    return (
        f"soak/{name}: {train['samples']} samples trained in {train['seconds']:.0f}s; producer "
        f"{ratio:.1f}x the trainer's rate; peak in-flight {peaks.in_flight_bytes} B, peak "
        f"resident {peaks.resident_bytes} B vs cap {CAP} B over {peaks.samples} samples "
        f"(peak {peaks.arena_runs} arena runs, {peaks.segments} segments) "
        f"({peaks.over_cap} over); {flow['pauses']} paused waits ({flow['paused_s']:.1f} worker-s paused); "
        f"resident after drain 0"
    )


def _check(flow: dict, train: dict, peaks: Peaks, factor: float) -> float:
    ratio = flow["unthrottled_samples_per_s"] / train["samples_per_s"]
    assert ratio >= factor, f"premise not met: producer only {ratio:.2f}x the trainer"
    assert peaks.samples >= 20, f"monitor sampled only {peaks.samples} times"
    assert peaks.over_cap == 0, (peaks, CAP)
    assert flow["refusals"] == 0, flow  # the cap was respected by pausing, never by refusing
    return ratio


def test_producer_4x_faster_stays_under_cap_and_pauses(tmp_path, summary):
    flow, train, peaks = soak(tmp_path, 40 if not LONG else 200, 1, delay=0.5)
    ratio = _check(flow, train, peaks, 4.0)
    assert flow["pauses"] >= 1, flow
    summary.append(_line("4x-producer", flow, train, peaks, ratio))


@pytest.mark.skipif(not LONG, reason="long soak: DATAFLOW_GATE_VARIANT=long (nox -s soak-long)")
def test_trainer_lagging_5x_long_run_drains_to_zero(tmp_path, summary):
    flow, train, peaks = soak(tmp_path, 400, 2, delay=0.6)
    ratio = _check(flow, train, peaks, 5.0)
    summary.append(_line("5x-lagging-trainer (long)", flow, train, peaks, ratio))


def test_trainer_lagging_5x_drains_to_zero(tmp_path, summary):
    flow, train, peaks = soak(tmp_path, 60, 1, delay=0.6)
    ratio = _check(flow, train, peaks, 5.0)
    summary.append(_line("5x-lagging-trainer", flow, train, peaks, ratio))
