"""``LeaseKeeper``: holds a run's consumer lease for one consumer process (docs/architecture.md §4).

Acquires the fenced lease when the consumer opens its run, renews it from a daemon heartbeat
thread every third of ``lease_s``, and releases it when the consumer finishes or fails. A
holder on this host whose process no longer exists is taken over at once (a crashed consumer
must not block ``--resume`` for a whole lease); any other live holder is refused with an error
naming it. Once a renewal is refused (another consumer took over after this one's lease
expired), ``check`` raises and every ack this keeper fences is refused by the ledger itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time

from dataflow.contracts.errors import (
    ClosedError,
    DataflowError,
    InvalidInputError,
    LedgerConflictError,
)
from dataflow.contracts.lease import ConsumerLease
from dataflow.contracts.processes import pid_alive
from dataflow.contracts.protocols import Ledger

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 30.0
"""How long a consumer's lease lasts without a heartbeat."""


class LeaseKeeper:
    """One consumer's hold on its run's lease; ``epoch`` fences its acks."""

    def __init__(self, ledger: Ledger, lease_s: float = DEFAULT_LEASE_S) -> None:
        if isinstance(lease_s, bool) or not isinstance(lease_s, int | float) or lease_s <= 0:
            raise InvalidInputError(f"lease_s must be a number > 0, got {lease_s!r}")
        self._ledger = ledger
        self._lease_s = float(lease_s)
        self._host = socket.gethostname()
        self._lease: ConsumerLease | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str = ""

    @property
    def epoch(self) -> int | None:
        """The held lease's epoch (``None`` before ``acquire`` or after ``release``)."""
        return None if self._lease is None else self._lease.epoch

    def acquire(self) -> ConsumerLease:
        """Take the lease and start the heartbeat; ``LedgerConflictError`` names a live holder."""
        pid = os.getpid()
        try:
            lease = self._ledger.acquire_consumer_lease(self._host, pid, self._lease_s)
        except LedgerConflictError:
            held = self._ledger.consumer_lease()
            if held.host != self._host or pid_alive(held.pid):
                raise
            log.warning(
                "taking over the consumer lease of process %d on this host: it no longer runs",
                held.pid,
            )
            lease = self._ledger.acquire_consumer_lease(
                self._host, pid, self._lease_s, takeover=True
            )
        self._lease = lease
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="consumer-lease", daemon=True)
        self._thread.start()
        return lease

    def check(self) -> None:
        """Raise ``LedgerConflictError`` if this consumer was fenced off."""
        if self._lost:
            raise LedgerConflictError(self._lost)

    def _beat(self) -> None:
        while not self._stop.wait(self._lease_s / 3):
            lease = self._lease
            if lease is None:
                return
            try:
                self._lease = self._ledger.renew_consumer_lease(lease.epoch, self._lease_s)
            except LedgerConflictError as exc:
                self._lost = str(exc)
                log.error("%s", exc)
                return
            except ClosedError:
                return  # the ledger was closed under the heartbeat: its consumer is gone
            except DataflowError as exc:  # a ledger hiccup: the next beat tries again
                log.warning("renewing the consumer lease failed: %s", exc)

    def release(self) -> None:
        """Stop the heartbeat and give the lease up (idempotent; never raises)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        lease, self._lease = self._lease, None
        if lease is not None and not self._lost:
            with contextlib.suppress(Exception):
                self._ledger.release_consumer_lease(lease.epoch)


def wait_for_expiry(ledger: Ledger, timeout_s: float) -> ConsumerLease:
    """Block until the run's lease is free or expired (for tests and operators)."""
    deadline = time.time() + timeout_s
    while True:
        held = ledger.consumer_lease()
        if held.pid == 0 or held.expires_at <= time.time() or time.time() > deadline:
            return held
        time.sleep(0.1)
