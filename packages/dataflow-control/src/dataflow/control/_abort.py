"""Freeing features of samples the ledger no longer needs, through the contracts' SampleAborter."""

from __future__ import annotations

from collections.abc import Iterable

from dataflow.contracts.errors import DataflowError
from dataflow.contracts.protocols import SampleAborter


class FeatureCleanupError(DataflowError):
    """Features could not be freed for some samples; the ledger change before it stands."""


def abort_features(aborter: SampleAborter | None, sample_ids: Iterable[str], reason: str) -> None:
    """Abort every id's features (all are tried), then raise one error naming each failure.

    With no aborter (a ledger-only run, or a store that frees on its own) nothing is done.
    """
    if aborter is None:
        return
    failures: list[str] = []
    for sample_id in sample_ids:
        try:
            aborter.abort(sample_id, reason)
        except Exception as exc:  # every failure is reported below, none is hidden
            failures.append(f"{sample_id}: {type(exc).__name__}: {exc}")
    if failures:
        raise FeatureCleanupError(
            f"could not free the features of {len(failures)} sample(s) ({reason}): "
            + "; ".join(failures)
        )
