"""Consumer-lease transactions, shared by every storage backend (memory, SQLite, Redis).

Stored as one meta key, ``consumer_lease`` (a :class:`ConsumerLease` as JSON), so each backend's
ordinary transaction makes acquire, renew, release and the fenced ack atomic.
"""

from __future__ import annotations

from dataflow.contracts.errors import CorruptRecordError, LedgerConflictError
from dataflow.contracts.lease import ConsumerLease
from dataflow.control.ledger._tx import LedgerTx

LEASE_KEY = "consumer_lease"


def current(tx: LedgerTx) -> ConsumerLease:
    """The stored lease (epoch 0 when none was ever taken)."""
    raw = tx.meta().get(LEASE_KEY)
    if not raw:
        return ConsumerLease()
    try:
        return ConsumerLease.loads(raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptRecordError(f"the ledger's consumer lease does not parse ({exc})") from None


def acquire(
    tx: LedgerTx, host: str, pid: int, now: float, lease_s: float, takeover: bool
) -> ConsumerLease:
    """Take the lease: refused while another holder's lease is live, unless ``takeover``."""
    held = current(tx)
    live = held.pid != 0 and held.expires_at > now
    if live and not takeover and (held.host, held.pid) != (host, pid):
        raise LedgerConflictError(
            f"another consumer holds this run: {held.describe(now)}; stop it, or wait for its "
            "lease to expire"
        )
    lease = ConsumerLease(held.epoch + 1, host, pid, now, now + lease_s)
    tx.set_meta({LEASE_KEY: lease.dumps()})
    return lease


def check_epoch(tx: LedgerTx, epoch: int, now: float, what: str) -> ConsumerLease:
    """The stored lease if ``epoch`` is still the current one; else the stale-epoch refusal."""
    held = current(tx)
    if held.epoch != epoch or held.pid == 0:
        holder = held.describe(now) if held.pid else "nobody (released)"
        raise LedgerConflictError(
            f"{what} refused: this consumer's lease (epoch {epoch}) is stale; the run is now "
            f"held by {holder}"
        )
    return held


def renew(tx: LedgerTx, epoch: int, now: float, lease_s: float) -> ConsumerLease:
    """Extend the current lease by ``lease_s`` from ``now`` (stale epoch refused)."""
    held = check_epoch(tx, epoch, now, "renewing the consumer lease")
    lease = ConsumerLease(held.epoch, held.host, held.pid, held.started, now + lease_s)
    tx.set_meta({LEASE_KEY: lease.dumps()})
    return lease


def release(tx: LedgerTx, epoch: int) -> None:
    """Give the lease up (a no-op when ``epoch`` is no longer the current one)."""
    held = current(tx)
    if held.epoch == epoch and held.pid:
        tx.set_meta({LEASE_KEY: ConsumerLease(held.epoch).dumps()})
