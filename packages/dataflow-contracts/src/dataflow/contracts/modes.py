"""DeploymentMode: where producer and trainer run, which selects ledger and ack policy."""

from __future__ import annotations

import enum


class DeploymentMode(enum.StrEnum):
    """How a run is deployed.

    - ``local_colocated``: one process, the lightweight plane: a ledger in process memory
      (``memory://`` online, ``noop://`` offline), no durable transaction, no I/O, features
      freed as they are consumed.
    - ``dataflow_colocated``: one host, the durable ledger and ack on the same code path.
    - ``disaggregated``: producer and trainer in different processes or hosts; durable ledger.
    """

    LOCAL_COLOCATED = "local_colocated"
    DATAFLOW_COLOCATED = "dataflow_colocated"
    DISAGGREGATED = "disaggregated"

    @property
    def durable(self) -> bool:
        """Whether this mode keeps a durable ledger (and so can resume after a crash)."""
        return self is not DeploymentMode.LOCAL_COLOCATED
