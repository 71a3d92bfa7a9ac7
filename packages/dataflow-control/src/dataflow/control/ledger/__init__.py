"""Ledgers: one run's durable source of truth, opened by URI (see ``open_ledger``).

``noop://`` retains nothing; ``memory://`` lives in the process; ``sqlite:///path`` is durable
on one host (several processes may share the file; never on a network filesystem);
``redis://host:port/db`` is durable across hosts. All but ``noop://`` share one implementation
of the rules (``StorageLedger``) over backend storage, and pass one conformance suite.
"""

from dataflow.control.ledger._ledger import DEFAULT_MAX_PROMPT_ATTEMPTS, StorageLedger
from dataflow.control.ledger._open import open_ledger
from dataflow.control.ledger._samples import PARTIAL_WINDOW
from dataflow.control.ledger.noop import NoopLedger

__all__ = [
    "DEFAULT_MAX_PROMPT_ATTEMPTS",
    "PARTIAL_WINDOW",
    "NoopLedger",
    "StorageLedger",
    "open_ledger",
]
