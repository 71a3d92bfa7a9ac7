"""WeightRegistry, StalenessGate and StalenessAdmission over a real (memory://) ledger."""

from __future__ import annotations

import pytest
from control_fixtures import ResidentFeatures, make_ref, make_refs, memory_uri

from dataflow.contracts import NotFoundError, WeightVersion
from dataflow.contracts.errors import InvalidInputError, LedgerConflictError, RunFailedError
from dataflow.control.drift import DriftMonitor
from dataflow.control.gate import StalenessAdmission, StalenessGate
from dataflow.control.ledger import open_ledger
from dataflow.control.staleness import StalenessPolicy, WeightRegistry


@pytest.fixture
def uri():
    return memory_uri()


@pytest.fixture
def ledger(uri):
    ledger = open_ledger(uri)
    ledger.open_run("run-stale", 4, resume=False)
    yield ledger
    ledger.close()


def publish(registry: WeightRegistry, *names: str) -> None:
    for step, name in enumerate(names):
        registry.publish(WeightVersion(name, step))


def test_registry_lag_follows_publish_order_and_unknown_is_none(ledger):
    registry = WeightRegistry(ledger)
    assert registry.latest() is None
    assert registry.draft_lag("v1") is None
    publish(registry, "v1", "v2", "v3")
    assert [v.version_id for v in registry.history()] == ["v1", "v2", "v3"]
    assert registry.latest().version_id == "v3"
    assert [registry.draft_lag(v) for v in ("v3", "v2", "v1")] == [0, 1, 2]
    assert registry.draft_lag(make_ref(0, draft="v2")) == 1
    assert registry.draft_lag(make_ref(1, draft=None)) is None
    assert registry.draft_lag("never") is None
    with pytest.raises(NotFoundError, match="weight version 'never' was never published"):
        registry.get("never")


def test_registry_publish_is_idempotent_and_shared_through_the_ledger(ledger, uri):
    writer, reader = WeightRegistry(ledger), WeightRegistry(open_ledger(uri))
    first = writer.publish(WeightVersion("v1", 10))
    again = writer.publish(WeightVersion("v1", 10))
    assert first == again and first.publish_order >= 1
    writer.publish(WeightVersion("v2", 20))
    assert reader.draft_lag("v1") is None  # not refreshed yet
    reader.refresh()
    assert reader.draft_lag("v1") == 1
    with pytest.raises(InvalidInputError, match="needs a WeightVersion, got dict"):
        writer.publish({"version_id": "v3"})  # type: ignore[arg-type]
    assert len(writer.history()) == 2


def test_gate_drops_stale_samples_in_the_ledger_with_reasons_and_frees_them(ledger):
    registry = WeightRegistry(ledger)
    publish(registry, "v1", "v2", "v3")
    features = ResidentFeatures()
    refs = [
        make_ref(0, draft="v3"),  # fresh
        make_ref(1, draft="v1"),  # lag 2 > 1
        make_ref(2, draft=None),  # unknown
        make_ref(3, draft="v2", target="target-old"),  # lag ok, wrong target
        make_ref(4, draft="v2"),  # fresh
        make_ref(5, draft="v1", target="target-old"),  # both
    ]
    ledger.commit(refs)
    features.put(refs)
    drift = DriftMonitor()
    gate = StalenessGate(
        ledger,
        registry,
        StalenessPolicy(max_draft_lag=1, require_target_match=True),
        "target-a",
        aborter=features,
        drift=drift,
    )
    fresh = gate.screen(refs)
    assert [r.sample_id for r in fresh] == ["s00000", "s00004"]
    status = ledger.status()
    assert status.samples["dropped"] == 4
    assert dict(status.dropped_reasons) == {
        "draft_lag>1": 1,
        "unknown_draft_version": 1,
        "target_version_mismatch": 1,
        "draft_lag>1,target_version_mismatch": 1,
    }
    assert features.resident == {"s00000", "s00004"}
    assert features.reasons()["s00002"] == "unknown_draft_version"
    # drift: only the dropped ones so far; the fresh ones count once they enter a window
    assert (drift.snapshot().observed, drift.snapshot().unknown) == (4, 1)
    gate.record_passed(fresh)
    snap = drift.snapshot()
    assert (snap.observed, snap.max_lag, gate.passed, gate.dropped) == (6, 2, 2, 4)


def test_gate_with_no_bounds_passes_everything(ledger):
    refs = make_refs(0, 3, draft=None)
    ledger.commit(refs)
    gate = StalenessGate(
        ledger, WeightRegistry(ledger), StalenessPolicy(require_target_match=False), "t"
    )
    assert gate.screen(refs) == refs
    assert ledger.status().samples["dropped"] == 0


def test_gate_refuses_an_empty_target_version(ledger):
    with pytest.raises(
        InvalidInputError, match="current_target_version must be None or a non-empty str"
    ):
        StalenessGate(ledger, WeightRegistry(ledger), StalenessPolicy(), "")


def test_gate_drop_of_a_sample_no_longer_in_flight_changes_nothing(ledger):
    refs = make_refs(0, 2, draft="never-published")
    ledger.commit(refs)
    ledger.drop(["s00001"], "elsewhere")
    features = ResidentFeatures()
    features.put(refs)
    gate = StalenessGate(
        ledger,
        WeightRegistry(ledger),
        StalenessPolicy(max_draft_lag=0),
        "target-a",
        aborter=features,
    )
    before = ledger.status()
    with pytest.raises(LedgerConflictError, match="drop refused, nothing changed"):
        gate.screen(refs)
    assert ledger.status() == before
    assert features.resident == {"s00000", "s00001"}


def test_admission_refuses_rollouts_that_would_arrive_too_stale(ledger):
    registry = WeightRegistry(ledger)
    publish(registry, "v1", "v2")
    policy = StalenessPolicy(max_draft_lag=1, require_target_match=True)
    admission = StalenessAdmission(
        ledger, registry, policy, "target-a", quantum=4, publishes_per_window=0.5
    )
    assert admission.assess("v1", "target-a").accept  # lag 1, nothing in flight
    assert not admission.assess(None, "target-a").accept
    assert admission.assess("v1", "target-b").reasons == ("target_version_mismatch",)
    ledger.commit(make_refs(0, 8))  # two windows ahead → one more publish expected
    assert admission.expected_extra_lag() == 1
    verdict = admission.assess("v1", "target-a")
    assert (verdict.accept, verdict.draft_lag, verdict.reasons) == (False, 2, ("draft_lag>1",))
    assert admission.assess("v2", "target-a").accept
    assert (admission.admitted, admission.refused) == (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantum": 0}, "quantum must be an int >= 1, got 0"),
        ({"quantum": 4, "publishes_per_window": -1}, "publishes_per_window must be a number >= 0"),
    ],
)
def test_bad_admission_arguments_are_refused(ledger, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        StalenessAdmission(ledger, WeightRegistry(ledger), StalenessPolicy(), "t", **kwargs)


def gated_consumer(ledger, features, *, max_draft_lag: int, lookahead: int = 2):
    from dataflow.control.consumer import ConsumerSide
    from dataflow.control.window import WindowShape

    registry = WeightRegistry(ledger)
    gate = StalenessGate(
        ledger,
        registry,
        StalenessPolicy(max_draft_lag=max_draft_lag, require_target_match=True),
        "target-a",
        aborter=features,
    )
    side = ConsumerSide(
        ledger,
        WindowShape(dp_size=1, batch_size=2),
        aborter=features,
        gate=gate,
        lookahead=lookahead,
    )
    return side, registry


def test_the_gate_in_front_of_the_queue_keeps_windows_whole(uri):
    ledger = open_ledger(uri)
    features = ResidentFeatures()
    side, registry = gated_consumer(ledger, features, max_draft_lag=1)
    side.open("run-gated")
    publish(registry, "v1", "v2", "v3")
    drafts = ["v3", "v1", "v3", None, "v2", "v3", "v2"]
    refs = [make_ref(i, draft=d) for i, d in enumerate(drafts)]
    features.put(refs)
    ledger.set_producer_state("running")
    ledger.commit(refs)
    ledger.set_producer_state("closed")
    queue = side.queue()
    windows = []
    while (first := queue.get(timeout=1)) is not None:
        windows.append([first.sample_id, queue.get(timeout=1).sample_id])
    assert windows == [["s00000", "s00002"], ["s00004", "s00005"]]
    status = side.status()
    assert dict(status.dropped_reasons) == {
        "draft_lag>1": 1,
        "unknown_draft_version": 1,
        "partial_window": 1,
    }
    assert features.reasons()["s00001"] == "draft_lag>1"
    assert features.reasons()["s00003"] == "unknown_draft_version"
    assert features.reasons()["s00006"] == "partial_window"
    assert status.drift_max == 2  # s00001 (lag 2) was observed when dropped
    assert status.drift_mean == pytest.approx((0 + 2 + 0 + 1 + 0) / 5)


def test_a_sample_going_stale_in_the_backlog_is_dropped_at_dispatch(uri):
    ledger = open_ledger(uri)
    features = ResidentFeatures()
    side, registry = gated_consumer(ledger, features, max_draft_lag=0, lookahead=1)
    side.open("run-gated")
    publish(registry, "v1")
    refs = [make_ref(i, draft="v1") for i in range(4)]
    features.put(refs)
    ledger.set_producer_state("running")
    ledger.commit(refs)
    queue = side.queue()
    first = [queue.get(timeout=1).sample_id for _ in range(2)]
    assert first == ["s00000", "s00001"]
    side.ack(0, first)
    registry.publish(WeightVersion("v2", 1))  # s00002, s00003 now lag 1 > 0
    with pytest.raises(TimeoutError):
        queue.get(timeout=0.05)
    assert dict(ledger.status().dropped_reasons) == {"draft_lag>0": 2}
    assert features.resident == {"s00000", "s00001"}


def test_gate_fails_fast_when_the_producer_stamps_no_draft_version(ledger):
    refs = make_refs(0, 2, draft=None)
    ledger.commit(refs)
    features = ResidentFeatures()
    features.put(refs)
    gate = StalenessGate(
        ledger, WeightRegistry(ledger), StalenessPolicy(max_draft_lag=1), None, aborter=features
    )
    before = ledger.status()
    with pytest.raises(RunFailedError, match=r"carry no draft weight version.*staleness.enabled"):
        gate.screen(refs)
    assert ledger.status() == before
    assert features.resident == {"s00000", "s00001"}


def test_gate_follows_the_target_the_newest_producer_declared(ledger):
    registry = WeightRegistry(ledger)
    publish(registry, "v1")
    refs = [make_ref(0, draft="v1", target="old"), make_ref(1, draft="v1", target="new")]
    ledger.commit(refs)
    ledger.declare_target("new")
    gate = StalenessGate(ledger, registry, StalenessPolicy(max_draft_lag=1), None)
    assert [r.sample_id for r in gate.screen(refs)] == ["s00001"]
    assert dict(ledger.status().dropped_reasons) == {"target_version_mismatch": 1}
    assert gate.dropped_reasons == {"target_version_mismatch": 1}
    assert ledger.status().drift_max == 0
