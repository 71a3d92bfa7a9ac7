"""dataflow.control — see this package's README for what it owns."""

from dataflow.control.ledger import PARTIAL_WINDOW, NoopLedger, StorageLedger, open_ledger
from dataflow.control.version import __version__

__all__ = ["PARTIAL_WINDOW", "NoopLedger", "StorageLedger", "__version__", "open_ledger"]
