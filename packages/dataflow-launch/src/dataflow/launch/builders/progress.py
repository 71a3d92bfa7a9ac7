"""Progress bars fed by the ledger: a background thread polls ``status()`` and moves a bar.

Reads go through a second ledger connection, so the bar never competes with the role's own
ledger object; ledgers another connection cannot see (``memory://``, ``noop://``) get no bar.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from types import TracebackType

from tqdm import tqdm

from dataflow.contracts import LedgerStatus
from dataflow.contracts.uris import parse_ledger_uri
from dataflow.control import open_ledger

SHAREABLE = ("sqlite", "redis")


def prompts_done(status: LedgerStatus) -> int:
    """Prompts captured (done or failed for good)."""
    return status.prompts.get("done", 0) + status.prompts.get("failed", 0)


def samples_settled(status: LedgerStatus) -> int:
    """Samples trained, released or dropped."""
    return sum(status.samples.get(k, 0) for k in ("trained", "released", "dropped"))


class LedgerBar:
    """A tqdm bar of ``count(status)`` out of ``total``, refreshed every ``interval_s``.

    Guarantees: the polling thread is stopped and joined on exit; a poll that fails (the
    ledger is busy or not created yet) is skipped, never raised into the role.
    """

    def __init__(
        self,
        ledger_uri: str,
        total: int,
        desc: str,
        count: Callable[[LedgerStatus], int],
        *,
        enabled: bool = True,
        interval_s: float = 0.5,
        position: int = 0,
    ) -> None:
        self._uri = ledger_uri
        self._enabled = enabled and parse_ledger_uri(ledger_uri).scheme in SHAREABLE
        self._total = total
        self._desc = desc
        self._count = count
        self._interval_s = interval_s
        self._position = position
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LedgerBar:
        if self._enabled:
            self._thread = threading.Thread(target=self._poll, name="ledger-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _poll(self) -> None:
        bar = tqdm(
            total=self._total,
            desc=self._desc,
            unit="it",
            position=self._position,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        ledger = None
        try:
            while True:
                stopping = self._stop.wait(self._interval_s)
                try:
                    if ledger is None:
                        ledger = open_ledger(self._uri)
                    value = min(self._count(ledger.status()), self._total)
                    bar.update(value - bar.n)
                except Exception:  # a busy or not-yet-created ledger: try again next tick
                    pass
                if stopping:
                    return
        finally:
            bar.close()
            if ledger is not None:
                ledger.close()
