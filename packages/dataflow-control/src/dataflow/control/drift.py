"""DriftMonitor: how far behind the newest draft weights the samples reaching the trainer are."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from dataflow.contracts.checks import is_int, is_number
from dataflow.contracts.errors import InvalidInputError
from dataflow.control._validate import positive_int


@dataclass(frozen=True)
class DriftSnapshot:
    """Drift figures: ``observed`` samples in all, ``unknown`` of them with no known version;
    ``window`` known lags kept, their ``mean_lag`` (0.0 when none) and ``max_lag`` (0 when none).
    """

    observed: int
    unknown: int
    window: int
    mean_lag: float
    max_lag: int


class DriftMonitor:
    """A rolling window over the draft lags of assessed samples (thread-safe).

    Unknown lags (None) are counted apart and kept out of the mean, which stays a lag in
    versions; ``drifting(threshold)`` is True when the rolling mean lag is above ``threshold``.
    """

    def __init__(self, window: int = 256) -> None:
        self._lags: deque[int] = deque(maxlen=positive_int("DriftMonitor", "window", window))
        self._lock = threading.Lock()
        self._observed = 0
        self._unknown = 0

    def observe(self, lag: int | None) -> None:
        """Record one sample's draft lag (None when its version is unknown)."""
        if lag is not None and (not is_int(lag) or lag < 0):
            raise InvalidInputError(f"DriftMonitor: lag must be None or an int >= 0, got {lag!r}")
        with self._lock:
            self._observed += 1
            if lag is None:
                self._unknown += 1
            else:
                self._lags.append(lag)

    def snapshot(self) -> DriftSnapshot:
        """The current figures."""
        with self._lock:
            lags = list(self._lags)
            return DriftSnapshot(
                observed=self._observed,
                unknown=self._unknown,
                window=len(lags),
                mean_lag=sum(lags) / len(lags) if lags else 0.0,
                max_lag=max(lags, default=0),
            )

    def drifting(self, threshold: float) -> bool:
        """Whether the rolling mean lag is above ``threshold`` versions."""
        if not is_number(threshold) or threshold < 0:
            raise InvalidInputError(
                f"DriftMonitor.drifting: threshold must be a number >= 0, got {threshold!r}"
            )
        return self.snapshot().mean_lag > threshold
