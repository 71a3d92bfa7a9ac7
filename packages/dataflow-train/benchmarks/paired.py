"""Paired step ratios under load: summary statistics and load sampling shared by the benches.

Both bench_train and bench_plane interleave the two loops step by step (each measured step of
one side has a step of the other side right beside it in time), take one ratio per pair, and
report the median with its spread, so a burst of load hits one or two pairs, not a verdict.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence


def load_1m() -> float:
    """The 1-minute load average now."""
    return os.getloadavg()[0]


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """Median, quartiles, extremes and count of ``values`` (at least one)."""
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "median": statistics.median(ordered),
        "q1": q1,
        "q3": q3,
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }


def describe(label: str, stats: dict[str, float | int]) -> str:
    """One line: median [q1, q3] (min..max, n pairs)."""
    return (
        f"{label}: median {stats['median']:.4f}  IQR [{stats['q1']:.4f}, {stats['q3']:.4f}]  "
        f"range [{stats['min']:.4f}, {stats['max']:.4f}]  ({stats['n']} pairs)"
    )
