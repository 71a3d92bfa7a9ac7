"""Staleness in an online run, per ``config.staleness``: the pieces each role gets.

- producer: ``draft_versions`` — the newest published draft version, stamped on each prompt
  when it is leased (waiting for the first publish, failing fast when none can come);
- trainer: ``publish_hook`` — a draft version at start, at each checkpoint and every
  ``publish_every`` steps, in the ledger; ``consumer_gate`` — the gate that drops stale
  samples before windows are cut; ``staleness_metrics`` — drift and drops for
  ``metrics.jsonl``; ``WaitingQueue`` — a trainer waiting for refs says why.

With staleness off every function returns None (and the run is as before, bit for bit).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from dataflow.contracts import FeatureStore, Ledger, RefQueue, SampleRef
from dataflow.control import StalenessGate, StalenessPolicy, WeightRegistry
from dataflow.launch.config import LaunchConfig
from dataflow.launch.producer.versions import DraftVersions
from dataflow.train.hooks import WeightPublishHook

log = logging.getLogger(__name__)


def draft_versions(config: LaunchConfig, ledger: Ledger) -> DraftVersions:
    """The producer's draft-version stamp; it must wait for a version when staleness is on."""
    stale = config.staleness
    return DraftVersions(
        ledger,
        required=stale.enabled,
        timeout_s=stale.first_version_timeout_s,
        poll_s=config.producer.poll_s,
    )


def declared_target(ledger: Ledger) -> Callable[[], str]:
    """The target the newest producer declared in ``ledger`` (``unknown`` before any)."""
    return lambda: ledger.markers().target_version or "unknown"


def publish_hook(config: LaunchConfig, ledger: Ledger, out_dir: Path) -> WeightPublishHook | None:
    """The trainer's draft-version publisher (None with staleness off)."""
    stale = config.staleness
    if not stale.enabled:
        return None
    return WeightPublishHook(
        ledger,
        out_dir / "weights",
        interval=stale.publish_every,
        at_checkpoints=True,
        initial=True,
        target_version=declared_target(ledger),
    )


def consumer_gate(
    config: LaunchConfig, ledger: Ledger, store: FeatureStore
) -> StalenessGate | None:
    """The gate in front of the windows (None with staleness off); it follows the ledger's
    declared target, so a producer restarted on another target retires the old one's samples.
    """
    stale = config.staleness
    if not stale.enabled:
        return None
    policy = StalenessPolicy(stale.max_draft_lag, stale.require_target_match)
    return StalenessGate(ledger, WeightRegistry(ledger), policy, None, aborter=store)


def staleness_metrics(gate: StalenessGate | None) -> Callable[[], dict[str, float]] | None:
    """Per-step figures for ``metrics.jsonl``: rolling draft lag mean/max, drops by reason,
    the newest publish order (None without a gate).
    """
    if gate is None:
        return None

    def figures() -> dict[str, float]:
        snap = gate.drift.snapshot()
        gate.registry.refresh()
        latest = gate.registry.latest()
        out: dict[str, float] = {
            "staleness/draft_lag_mean": snap.mean_lag,
            "staleness/draft_lag_max": float(snap.max_lag),
            "staleness/passed": float(gate.passed),
            "staleness/dropped": float(gate.dropped),
            "staleness/weight_version": float(latest.publish_order if latest else 0),
        }
        for reason, count in sorted(gate.dropped_reasons.items()):
            out[f"staleness/dropped/{reason}"] = float(count)
        return out

    return figures


class WaitingQueue:
    """A ``RefQueue`` that logs why the trainer waits when no ref comes for ``log_every_s``.

    Guarantees: ``get``/``close`` behave as the inner queue's (same refs, ``None``, errors and
    overall ``timeout``); only a log line is added per ``log_every_s`` of waiting.
    """

    def __init__(self, inner: RefQueue, ledger: Ledger, *, log_every_s: float = 30.0) -> None:
        self._inner = inner
        self._ledger = ledger
        self._every = log_every_s

    def get(self, timeout: float | None = None) -> SampleRef | None:
        started = time.monotonic()
        while True:
            slice_s = self._every
            if timeout is not None:
                slice_s = max(0.0, min(slice_s, started + timeout - time.monotonic()))
            try:
                return self._inner.get(timeout=slice_s)
            except TimeoutError:
                if timeout is not None and time.monotonic() - started >= timeout:
                    raise
                self._explain(time.monotonic() - started)

    def _explain(self, waited: float) -> None:
        status = self._ledger.status()
        markers = status.markers
        log.warning(
            "trainer waiting %.0fs for a window: backlog %d (a window needs %d), producer %s, "
            "%d prompt(s) pending, dropped %s",
            waited,
            status.backlog,
            markers.quantum,
            markers.producer.value,
            status.prompts.get("pending", 0),
            dict(status.dropped_reasons) or "none",
        )

    def close(self) -> None:
        self._inner.close()
