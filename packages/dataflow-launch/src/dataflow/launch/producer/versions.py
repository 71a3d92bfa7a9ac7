"""DraftVersions: the draft version a rollout producer stamps on the prompts it leases.

The stamp is the newest draft-weight version published in the run's ledger when the prompt is
leased. With staleness on, a sample without a version would be maximally stale, so before the
trainer's first publish the producer waits — saying why, every ``log_every_s`` — and fails
fast, naming the setting, when no version can come: the consumer ended or failed first, or
none came within ``timeout_s``.
"""

from __future__ import annotations

import logging
import threading
import time

from dataflow.contracts import ConsumerState, Ledger, RunFailedError
from dataflow.control.staleness import WeightRegistry

log = logging.getLogger(__name__)


class DraftVersions:
    """A callable giving the newest published draft version id (thread-safe).

    Guarantees: with ``required`` False it returns the newest id or None, never waiting. With
    ``required`` True it returns an id, waiting for the first publish while logging why; it
    raises ``RunFailedError`` naming ``staleness.enabled`` when the consumer is DONE or FAILED
    with no version published, or after ``timeout_s`` without one, and returns None at once
    once ``stop`` was called (the caller is shutting down).
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        required: bool,
        timeout_s: float = 300.0,
        poll_s: float = 0.05,
        log_every_s: float = 10.0,
    ) -> None:
        self._ledger = ledger
        self._registry = WeightRegistry(ledger)
        self.required = required
        self._timeout_s = timeout_s
        self._poll_s = poll_s
        self._log_every_s = log_every_s
        self._stop = threading.Event()
        self.waited_s = 0.0

    def stop(self) -> None:
        """Stop waiting (idempotent)."""
        self._stop.set()

    def latest(self) -> str | None:
        """The newest published version id, or None before the first publish."""
        self._registry.refresh()
        newest = self._registry.latest()
        return None if newest is None else newest.version_id

    def __call__(self) -> str | None:
        newest = self.latest()
        if newest is not None or not self.required:
            return newest
        return self._wait_first()

    def _wait_first(self) -> str | None:
        started = time.monotonic()
        logged = started
        while not self._stop.is_set():
            newest = self.latest()
            if newest is not None:
                self.waited_s += time.monotonic() - started
                return newest
            now = time.monotonic()
            markers = self._ledger.markers()
            if markers.consumer in (ConsumerState.DONE, ConsumerState.FAILED):
                raise RunFailedError(
                    f"staleness.enabled: the consumer is {markers.consumer.value} and never "
                    "published a draft weight version, so no sample can be stamped with one; "
                    "enable staleness on the trainer too, or disable it here"
                )
            if now - started >= self._timeout_s:
                raise RunFailedError(
                    f"staleness.enabled: no draft weight version was published within "
                    f"{self._timeout_s:g}s (staleness.first_version_timeout_s); the trainer "
                    "publishes one when it starts training — is it running with staleness on?"
                )
            if now - logged >= self._log_every_s:
                log.warning(
                    "producer waiting %.0fs for the trainer's first draft weight version "
                    "(staleness.enabled: samples must carry one)",
                    now - started,
                )
                logged = now
            self._stop.wait(self._poll_s)
        return None
