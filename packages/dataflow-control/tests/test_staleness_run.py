"""Staleness over a whole run on a real SQLite ledger: a trainer publishing every N steps, a
slowed producer whose samples age, and a producer restarted on another target.

The schedule is scripted round by round (lease, commit, one training step, publish), so the
drops are deterministic and an independent reference computation predicts them exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from control_fixtures import ResidentFeatures, make_ref

from dataflow.contracts import SampleRef, WeightVersion
from dataflow.control import Controller, StalenessGate, StalenessPolicy, WeightRegistry
from dataflow.control.ledger import open_ledger
from dataflow.control.window import WindowShape

QUANTUM = 2


@dataclass(frozen=True)
class Planned:
    """Sample ``index`` is leased in round ``lease`` and committed ``delay`` rounds later."""

    index: int
    lease: int
    delay: int


def _plan(count: int, seed: int) -> list[Planned]:
    rng = random.Random(seed)
    plan = []
    for i in range(count):
        slow = rng.random() < 0.35  # the slowed producer: some captures take many rounds
        plan.append(Planned(i, lease=i // 2, delay=rng.randint(5, 12) if slow else 0))
    return plan


def _reference(plan: list[Planned], every: int, max_lag: int, rounds: int) -> set[int]:
    """Which samples the gate must drop, computed without the control plane.

    Each round: the round's leases take the newest publish order as their stamp, due samples
    join the committed FIFO in commit order, then one window is cut from the FIFO head — stale
    head samples (lag = newest order - stamp > max_lag) are dropped and the window filled from
    the next ones — trained, and every ``every`` steps a version is published.
    """
    published, step = 1, 0  # version "step0" is published before anything is leased
    stamp: dict[int, int] = {}
    fifo: list[int] = []
    dropped: set[int] = set()
    for r in range(rounds):
        for p in plan:
            if p.lease == r:
                stamp[p.index] = published
        fifo += [p.index for p in plan if p.lease + p.delay == r]
        window: list[int] | None = None
        while len(fifo) >= QUANTUM:  # the gate screens only a whole quantum at the head
            stale = [i for i in fifo[:QUANTUM] if published - stamp[i] > max_lag]
            if not stale:
                window, fifo = fifo[:QUANTUM], fifo[QUANTUM:]
                break
            dropped.update(stale)
            fifo = [i for i in fifo if i not in stale]
        if window is None:
            continue
        step += 1
        if step % every == 0:
            published += 1
    return dropped


def _run(tmp_path, plan, every, max_lag, rounds):
    ledger = open_ledger(f"sqlite:///{tmp_path}/ledger.sqlite")
    features = ResidentFeatures()
    registry = WeightRegistry(ledger)
    gate = StalenessGate(
        ledger, registry, StalenessPolicy(max_draft_lag=max_lag), None, aborter=features
    )
    consumer = Controller(ledger, aborter=features).consumer(
        WindowShape(1, QUANTUM, 1), gate=gate, release="on_ack", lookahead=1
    )
    consumer.open("run-stale")
    ledger.declare_target("target-a")
    registry.publish(WeightVersion("step0", 0))
    queue = consumer.queue()
    stamped: dict[int, str] = {}
    step = 0
    trained: list[str] = []
    for r in range(rounds):
        for p in plan:
            if p.lease == r:
                stamped[p.index] = registry.latest().version_id  # type: ignore[union-attr]
        due = [make_ref(p.index, draft=stamped[p.index]) for p in plan if p.lease + p.delay == r]
        if due:
            ledger.commit(due)
            features.put(due)
        window: list[SampleRef] = []
        try:
            while len(window) < QUANTUM:
                ref = queue.get(timeout=0)
                assert ref is not None
                window.append(ref)
        except TimeoutError:
            assert not window
            continue
        step += 1
        consumer.ack(step, [ref.sample_id for ref in window])
        trained += [ref.sample_id for ref in window]
        if step % every == 0:
            registry.publish(WeightVersion(f"step{step}", step))
    return ledger, features, trained, gate


def test_exactly_the_predicted_stale_samples_are_dropped_and_the_rest_trained_once(tmp_path):
    plan, every, max_lag = _plan(40, seed=7), 2, 1
    rounds = max(p.lease + p.delay for p in plan) + 60
    expected = {f"s{i:05d}" for i in _reference(plan, every, max_lag, rounds)}
    ledger, features, trained, gate = _run(tmp_path, plan, every, max_lag, rounds)
    status = ledger.status()
    assert 0 < len(expected) < len(plan)  # the schedule really ages some samples, not all
    assert dict(status.dropped_reasons) == {f"draft_lag>{max_lag}": len(expected)}
    assert {sid for sid, reason in features.aborted if reason.startswith("draft_lag")} == expected
    assert len(trained) == len(set(trained)) == len(plan) - len(expected)
    assert set(trained) == {f"s{i:05d}" for i in range(len(plan))} - expected
    assert status.samples["trained"] + status.samples["released"] == len(trained)
    assert status.drift_max is not None and status.drift_max > max_lag  # drops are seen too
    assert gate.dropped == len(expected) and gate.passed == len(trained)


def test_a_producer_restarted_on_another_target_retires_the_old_targets_queued_samples(tmp_path):
    ledger = open_ledger(f"sqlite:///{tmp_path}/ledger.sqlite")
    features = ResidentFeatures()
    registry = WeightRegistry(ledger)
    gate = StalenessGate(ledger, registry, StalenessPolicy(max_draft_lag=3), None, aborter=features)
    consumer = Controller(ledger, aborter=features).consumer(
        WindowShape(1, QUANTUM, 1), gate=gate, release="on_ack", lookahead=1
    )
    consumer.open("run-target")
    registry.publish(WeightVersion("step0", 0))
    ledger.declare_target("target-a")
    old = [make_ref(i, draft="step0", target="target-a") for i in range(6)]
    ledger.commit(old)
    features.put(old)
    queue = consumer.queue()
    first = [queue.get(timeout=0), queue.get(timeout=0)]
    consumer.ack(1, [ref.sample_id for ref in first if ref is not None])
    # the producer restarts on target B: the 4 old samples still queued must not be trained
    ledger.declare_target("target-b")
    new = [make_ref(i, draft="step0", target="target-b") for i in range(6, 10)]
    ledger.commit(new)
    features.put(new)
    rest = []
    for step in (2, 3):
        window = [queue.get(timeout=0), queue.get(timeout=0)]
        rest += [ref.sample_id for ref in window if ref is not None]
        consumer.ack(step, rest[-2:])
    assert rest == [ref.sample_id for ref in new]
    old_queued = {ref.sample_id for ref in old[2:]}
    assert dict(ledger.status().dropped_reasons) == {"target_version_mismatch": 4}
    assert {sid for sid, why in features.aborted if why == "target_version_mismatch"} == old_queued
    assert old_queued.isdisjoint(features.resident)
