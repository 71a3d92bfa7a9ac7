"""Optional read-only ledger queries the control logic uses when a ledger offers them.

They let features be freed *before* the ledger's state change that makes them unneeded, so a
crash in between is simply redone after a restart instead of leaking the features.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from dataflow.contracts.features import SampleRef


@runtime_checkable
class BacklogReader(Protocol):
    """Lists the head of the backlog: the oldest ``limit`` COMMITTED refs, in commit order."""

    def committed(self, limit: int) -> list[SampleRef]: ...


@runtime_checkable
class TrainedReader(Protocol):
    """Lists the TRAINED refs whose step is at most ``step``."""

    def trained_through(self, step: int) -> list[SampleRef]: ...
