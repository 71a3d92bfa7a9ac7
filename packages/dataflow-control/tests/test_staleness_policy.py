"""StalenessPolicy and DriftMonitor: pure logic, no ledger."""

from __future__ import annotations

import threading

import pytest

from dataflow.contracts.errors import InvalidInputError
from dataflow.control.drift import DriftMonitor, DriftSnapshot
from dataflow.control.staleness import StalenessAssessment, StalenessPolicy


def test_no_bounds_and_matching_target_accepts_everything():
    policy = StalenessPolicy()
    for lag in (None, 0, 50):
        verdict = policy.assess(lag, "t1", "t1")
        assert verdict == StalenessAssessment(True, lag, False, ())
        assert verdict.reason == ""


def test_draft_lag_bound():
    policy = StalenessPolicy(max_draft_lag=2, require_target_match=False)
    assert policy.assess(2, "t", "other").accept
    verdict = policy.assess(3, "t", "other")
    assert verdict == StalenessAssessment(False, 3, False, ("draft_lag>2",))


def test_unknown_draft_version_is_maximally_stale_once_bounded():
    verdict = StalenessPolicy(max_draft_lag=100).assess(None, "t", "t")
    assert not verdict.accept
    assert verdict.reasons == ("unknown_draft_version",)


def test_target_axis_and_both_reasons_together():
    policy = StalenessPolicy(max_draft_lag=0, require_target_match=True)
    verdict = policy.assess(1, "old-target", "new-target")
    assert verdict.target_stale
    assert verdict.reasons == ("draft_lag>0", "target_version_mismatch")
    assert verdict.reason == "draft_lag>0,target_version_mismatch"


def test_extra_lag_predicts_arrival_lag():
    policy = StalenessPolicy(max_draft_lag=2, require_target_match=False)
    assert policy.assess(1, "t", "t", extra_lag=1).accept
    verdict = policy.assess(1, "t", "t", extra_lag=2)
    assert (verdict.accept, verdict.draft_lag) == (False, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_draft_lag": -1}, "max_draft_lag must be an int >= 0, got -1"),
        ({"max_draft_lag": 1.5}, "max_draft_lag must be an int >= 0, got 1.5"),
        ({"max_draft_lag": True}, "max_draft_lag must be an int >= 0, got True"),
        ({"require_target_match": "yes"}, "require_target_match must be a bool, got 'yes'"),
    ],
)
def test_bad_policy_arguments_are_refused(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        StalenessPolicy(**kwargs)


def test_drift_monitor_rolls_over_its_window_and_counts_unknown():
    drift = DriftMonitor(window=3)
    assert drift.snapshot() == DriftSnapshot(0, 0, 0, 0.0, 0)
    for lag in (9, None, 1, 2, 3):
        drift.observe(lag)
    assert drift.snapshot() == DriftSnapshot(
        observed=5, unknown=1, window=3, mean_lag=2.0, max_lag=3
    )
    assert drift.drifting(1.5)
    assert not drift.drifting(2.0)


def test_drift_monitor_is_thread_safe():
    drift = DriftMonitor(window=10_000)

    def feed() -> None:
        for i in range(1000):
            drift.observe(i % 3 if i % 10 else None)

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = drift.snapshot()
    assert (snap.observed, snap.unknown, snap.window) == (4000, 400, 3600)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: DriftMonitor(window=0), "window must be an int >= 1, got 0"),
        (lambda: DriftMonitor().observe(-1), "lag must be None or an int >= 0, got -1"),
        (lambda: DriftMonitor().observe(1.0), "lag must be None or an int >= 0, got 1.0"),
        (lambda: DriftMonitor().drifting(-0.5), "threshold must be a number >= 0, got -0.5"),
    ],
)
def test_bad_drift_arguments_are_refused(call, message):
    with pytest.raises(InvalidInputError, match=message):
        call()


def test_refused_observation_changes_nothing():
    drift = DriftMonitor()
    drift.observe(4)
    before = drift.snapshot()
    with pytest.raises(InvalidInputError):
        drift.observe(-3)
    assert drift.snapshot() == before
