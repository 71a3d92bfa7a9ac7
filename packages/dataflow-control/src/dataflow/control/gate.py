"""The staleness gate in front of the trainer's queues and the producer's admission control.

The gate screens committed samples *before* they are cut into optimizer windows (dispatch calls
it), so a dropped sample never leaves a hole in a rank's share of a window: the window is filled
from the next fresh samples instead. Stale samples are DROPPED in the ledger with their reasons
(so ``status()`` shows every one) and their features aborted.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence

from dataflow.contracts.errors import InvalidInputError, RunFailedError
from dataflow.contracts.features import SampleRef
from dataflow.contracts.protocols import Ledger, SampleAborter
from dataflow.control._abort import abort_features
from dataflow.control._validate import positive_int
from dataflow.control.drift import DriftMonitor
from dataflow.control.staleness import StalenessAssessment, StalenessPolicy, WeightRegistry

_log = logging.getLogger(__name__)


class StalenessGate:
    """Drops stale samples from the ledger and frees their features; passes fresh ones on.

    Guarantees: ``screen`` returns the fresh refs in their given order; every rejected ref is
    DROPPED in the ledger with its reasons joined by "," (one transaction per distinct reason)
    before its features are aborted. The drift monitor sees each sample once: a dropped one
    when it is dropped, a fresh one when ``record_passed`` says it went into a window (a
    sample can be screened several times while it waits for its window).

    The current target is ``current_target_version`` when given; None follows the ledger's
    ``target_version`` marker, which the newest producer declares, so the samples of a target
    the producer no longer runs are dropped. A sample carrying no draft version at all while
    the policy bounds the draft lag is dropped as unknown; a whole screened batch of such
    samples means the producer stamps none and every sample would be dropped, so ``screen``
    raises ``RunFailedError`` instead (nothing changed).
    """

    def __init__(
        self,
        ledger: Ledger,
        registry: WeightRegistry,
        policy: StalenessPolicy,
        current_target_version: str | None,
        *,
        aborter: SampleAborter | None = None,
        drift: DriftMonitor | None = None,
    ) -> None:
        if current_target_version is not None and (
            not isinstance(current_target_version, str) or not current_target_version
        ):
            raise InvalidInputError(
                "StalenessGate: current_target_version must be None or a non-empty str, "
                f"got {current_target_version!r}"
            )
        self._ledger = ledger
        self.registry = registry
        self.policy = policy
        self.current_target_version = current_target_version
        self._aborter = aborter
        self.drift = drift if drift is not None else DriftMonitor()
        self._follows_ledger = current_target_version is None
        self._lock = threading.Lock()
        self.passed = 0
        self.dropped = 0
        self.dropped_reasons: dict[str, int] = {}

    def assess(self, ref: SampleRef) -> StalenessAssessment:
        """The policy's verdict on ``ref`` against the registry as last refreshed."""
        current = self.current_target_version
        return self.policy.assess(
            self.registry.draft_lag(ref),
            ref.target_version,
            ref.target_version if current is None else current,
        )

    def _check_stamped(self, refs: Sequence[SampleRef]) -> None:
        if self.policy.max_draft_lag is None:
            return
        if all(ref.draft_weight_version is None for ref in refs):
            ref = refs[0]
            raise RunFailedError(
                f"sample {ref.sample_id!r} and the {len(refs) - 1} after it carry no draft "
                "weight version, but the "
                f"staleness policy bounds the draft lag (max_draft_lag="
                f"{self.policy.max_draft_lag}): its producer stamps none, so every sample "
                "would be dropped; run the producer with staleness enabled too "
                "(staleness.enabled)"
            )

    def screen(self, refs: Sequence[SampleRef]) -> list[SampleRef]:
        """Drop the stale refs of ``refs`` (ledger + features) and return the fresh ones."""
        if not refs:
            return []
        self._check_stamped(refs)
        self.registry.refresh()
        if self._follows_ledger:
            declared = self._ledger.markers().target_version
            self.current_target_version = declared or None
        fresh: list[SampleRef] = []
        stale: dict[str, list[str]] = {}
        lags: list[int | None] = []
        for ref in refs:
            verdict = self.assess(ref)
            if verdict.accept:
                fresh.append(ref)
            else:
                lags.append(verdict.draft_lag)
                stale.setdefault(verdict.reason, []).append(ref.sample_id)
        for reason, ids in stale.items():
            self._ledger.drop(ids, reason)
            _log.info("dropped %d stale sample(s) (%s)", len(ids), reason)
        for lag in lags:
            self.drift.observe(lag)
        with self._lock:
            self.dropped += len(lags)
            for reason, ids in stale.items():
                self.dropped_reasons[reason] = self.dropped_reasons.get(reason, 0) + len(ids)
        for reason, ids in stale.items():
            abort_features(self._aborter, ids, reason)
        if lags:
            self._record_drift()
        return fresh

    def _record_drift(self) -> None:
        snap = self.drift.snapshot()
        self._ledger.record_drift(snap.mean_lag, snap.max_lag)

    def record_passed(self, refs: Sequence[SampleRef]) -> None:
        """Count ``refs`` as passed into a window and feed their lags to the drift monitor."""
        for ref in refs:
            self.drift.observe(self.registry.draft_lag(ref))
        with self._lock:
            self.passed += len(refs)
        if refs:
            self._record_drift()


class StalenessAdmission:
    """Refuses to start a rollout whose sample would be too stale by the time it is trained.

    The predicted lag is the draft version's lag now plus the weight publishes expected while
    the samples already in flight are trained ahead of it:
    ``floor(in_flight / quantum x publishes_per_window)``. Counts what it admitted and refused.
    """

    def __init__(
        self,
        ledger: Ledger,
        registry: WeightRegistry,
        policy: StalenessPolicy,
        current_target_version: str,
        quantum: int,
        *,
        publishes_per_window: float = 0.0,
    ) -> None:
        positive_int("StalenessAdmission", "quantum", quantum)
        if (
            isinstance(publishes_per_window, bool)
            or not isinstance(publishes_per_window, int | float)
            or publishes_per_window < 0
        ):
            raise InvalidInputError(
                "StalenessAdmission: publishes_per_window must be a number >= 0, "
                f"got {publishes_per_window!r}"
            )
        self._ledger = ledger
        self.registry = registry
        self.policy = policy
        self.current_target_version = current_target_version
        self.quantum = quantum
        self.publishes_per_window = float(publishes_per_window)
        self._lock = threading.Lock()
        self.admitted = 0
        self.refused = 0

    def expected_extra_lag(self) -> int:
        """Publishes expected before a rollout started now reaches the optimizer."""
        windows_ahead = self._ledger.status().in_flight / self.quantum
        return math.floor(windows_ahead * self.publishes_per_window)

    def assess(self, draft_version: str | None, target_version: str) -> StalenessAssessment:
        """The verdict on starting a rollout with these versions now (counted)."""
        self.registry.refresh()
        verdict = self.policy.assess(
            self.registry.draft_lag(draft_version),
            target_version,
            self.current_target_version,
            extra_lag=self.expected_extra_lag(),
        )
        with self._lock:
            if verdict.accept:
                self.admitted += 1
            else:
                self.refused += 1
        return verdict
