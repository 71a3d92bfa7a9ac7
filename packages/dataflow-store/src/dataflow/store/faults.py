"""A small fault hook, for tests that need a failure a real backend cannot produce on demand.

Stores accept ``faults=FaultInjector()``; production code never passes one. The hook only ever
*adds* a failure in front of the real operation, which still runs on the next attempt.
"""

from __future__ import annotations

import threading


class FaultInjector:
    """Makes the next ``n`` physical frees of a store raise ``OSError`` before touching data.

    Guarantees: thread-safe; each armed failure fires exactly once; ``fired`` counts them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._delete_failures = 0
        self.fired = 0

    def fail_next_deletes(self, count: int) -> None:
        """Arm ``count`` more failures of physical frees."""
        with self._lock:
            self._delete_failures += count

    def clear(self) -> None:
        """Disarm every failure still armed."""
        with self._lock:
            self._delete_failures = 0

    def before_delete(self, sample_id: str, generation: int) -> None:
        """Called by a store right before it frees one generation; raises if a failure is armed."""
        with self._lock:
            if self._delete_failures <= 0:
                return
            self._delete_failures -= 1
            self.fired += 1
        raise OSError(f"injected failure freeing {sample_id!r} generation {generation}")
