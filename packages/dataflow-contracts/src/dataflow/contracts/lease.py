"""The consumer lease: which process may train a run (docs/architecture.md §4).

A run has at most one live consumer. It holds a fenced lease in the ledger: an ``epoch`` that
grows by one at every acquisition, the holder's host, pid and start time, and the wall-clock
time the lease expires unless renewed. A second consumer is refused while the lease is live
(the error names the holder); after it expires it may take over, and every ack still carrying
the old epoch is then refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ConsumerLease:
    """One acquisition of a run's consumer lease (``epoch`` 0: never held)."""

    epoch: int = 0
    host: str = ""
    pid: int = 0
    started: float = 0.0
    expires_at: float = 0.0

    def describe(self, now: float) -> str:
        """``host <h> pid <p> since <time>, lease expires in <s>s`` for error messages."""
        import time

        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))
        left = self.expires_at - now
        tail = f"expires in {left:.0f}s" if left > 0 else f"expired {-left:.0f}s ago"
        return f"host {self.host} pid {self.pid} (epoch {self.epoch}, since {since}, lease {tail})"

    def dumps(self) -> str:
        """The stored form (one JSON object)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> ConsumerLease:
        """Parse the stored form; ``ValueError``/``TypeError`` on a malformed one."""
        data = json.loads(text)
        return cls(
            epoch=int(data["epoch"]),
            host=str(data["host"]),
            pid=int(data["pid"]),
            started=float(data["started"]),
            expires_at=float(data["expires_at"]),
        )
