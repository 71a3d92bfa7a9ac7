"""Staleness on two axes: draft-weight lag (publish order) and target-model match.

``WeightRegistry`` reads the ledger's weight-version registry, so every process sees the same
publish order; ``StalenessPolicy`` turns a sample's versions into an accept/reject assessment
with reasons. The gate and the producer admission built on them live in ``dataflow.control.gate``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from dataflow.contracts.errors import InvalidInputError, NotFoundError
from dataflow.contracts.features import SampleRef
from dataflow.contracts.prompt import PromptTask
from dataflow.contracts.protocols import Ledger
from dataflow.contracts.weights import WeightVersion
from dataflow.control._validate import non_negative_int

UNKNOWN_DRAFT_VERSION = "unknown_draft_version"
TARGET_VERSION_MISMATCH = "target_version_mismatch"


def draft_lag_reason(max_draft_lag: int) -> str:
    """The drop reason of a sample whose draft lag passed ``max_draft_lag``."""
    return f"draft_lag>{max_draft_lag}"


class WeightRegistry:
    """The publish-ordered history of draft-weight versions, persisted in the ledger.

    Guarantees: ``publish`` is idempotent on version id (the ledger's record is returned);
    ``draft_lag`` is the number of versions published after the sample's one (0 = newest) as of
    the last ``refresh``/``publish``, and ``None`` when the version is unknown (or the sample has
    none), which policies treat as maximally stale.
    """

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._lock = threading.Lock()
        self._history: tuple[WeightVersion, ...] = ()
        self._position: dict[str, int] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read the registry from the ledger (other processes may have published)."""
        versions = sorted(self._ledger.weight_versions(), key=lambda v: v.publish_order)
        with self._lock:
            self._history = tuple(versions)
            self._position = {v.version_id: i for i, v in enumerate(versions)}

    def publish(self, version: WeightVersion) -> WeightVersion:
        """Publish ``version`` in the ledger (idempotent) and return the stored record."""
        if not isinstance(version, WeightVersion):
            raise InvalidInputError(
                f"WeightRegistry.publish needs a WeightVersion, got {type(version).__name__}"
            )
        stored = self._ledger.publish_weight(version)
        self.refresh()
        return stored

    def history(self) -> tuple[WeightVersion, ...]:
        """Every known version, oldest first."""
        with self._lock:
            return self._history

    def latest(self) -> WeightVersion | None:
        """The newest published version, or None before the first publish."""
        with self._lock:
            return self._history[-1] if self._history else None

    def get(self, version_id: str) -> WeightVersion:
        """The version named ``version_id``; ``NotFoundError`` if it was never published."""
        with self._lock:
            index = self._position.get(version_id)
            if index is None:
                raise NotFoundError(f"weight version {version_id!r} was never published")
            return self._history[index]

    def draft_lag(self, sample: SampleRef | PromptTask | str | None) -> int | None:
        """Versions published after the sample's draft version; None when unknown."""
        version_id = (
            sample.draft_weight_version if isinstance(sample, SampleRef | PromptTask) else sample
        )
        if version_id is None:
            return None
        with self._lock:
            index = self._position.get(version_id)
            return None if index is None else len(self._history) - 1 - index


@dataclass(frozen=True)
class StalenessAssessment:
    """The verdict on one sample (or one rollout about to start).

    ``accept`` is True exactly when ``reasons`` is empty; ``draft_lag`` is None when unknown.
    """

    accept: bool
    draft_lag: int | None
    target_stale: bool
    reasons: tuple[str, ...]

    @property
    def reason(self) -> str:
        """The reasons joined into one drop reason (empty when accepted)."""
        return ",".join(self.reasons)


@dataclass(frozen=True)
class StalenessPolicy:
    """Accept or reject by draft lag and target version.

    - ``max_draft_lag`` (None: no bound): a lag above it rejects with ``draft_lag>N``; with a
      bound set, an unknown draft version rejects with ``unknown_draft_version``;
    - ``require_target_match``: a sample made by a different target than the current one
      rejects with ``target_version_mismatch``.
    """

    max_draft_lag: int | None = None
    require_target_match: bool = True

    def __post_init__(self) -> None:
        if self.max_draft_lag is not None:
            non_negative_int("StalenessPolicy", "max_draft_lag", self.max_draft_lag)
        if not isinstance(self.require_target_match, bool):
            raise InvalidInputError(
                "StalenessPolicy: require_target_match must be a bool, "
                f"got {self.require_target_match!r}"
            )

    def assess(
        self,
        draft_lag: int | None,
        target_version: str,
        current_target_version: str,
        *,
        extra_lag: int = 0,
    ) -> StalenessAssessment:
        """Judge a sample with ``draft_lag`` (plus ``extra_lag`` expected before it is used)."""
        reasons: list[str] = []
        lag = None if draft_lag is None else draft_lag + extra_lag
        if self.max_draft_lag is not None:
            if lag is None:
                reasons.append(UNKNOWN_DRAFT_VERSION)
            elif lag > self.max_draft_lag:
                reasons.append(draft_lag_reason(self.max_draft_lag))
        target_stale = self.require_target_match and target_version != current_target_version
        if target_stale:
            reasons.append(TARGET_VERSION_MISMATCH)
        return StalenessAssessment(
            accept=not reasons, draft_lag=lag, target_stale=target_stale, reasons=tuple(reasons)
        )
