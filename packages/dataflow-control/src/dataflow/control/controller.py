"""Controller: one run's control plane over one ledger, handing each side what it needs.

The controller is passive — producers and trainers call into it — and keeps no state of its own
that matters across processes: everything lives in the ledger, so a producer and a consumer in
different processes (or hosts) each build a ``Controller`` over the same ledger URI.
"""

from __future__ import annotations

import time
from typing import Any

from dataflow.contracts.errors import LedgerConflictError, RunFailedError
from dataflow.contracts.protocols import Collective, Ledger, SampleAborter
from dataflow.contracts.states import ConsumerState, LedgerStatus
from dataflow.control._validate import optional_timeout
from dataflow.control.consumer import ConsumerSide, ReleasePolicy
from dataflow.control.flow import FlowControl, FlowLimits
from dataflow.control.gate import StalenessAdmission, StalenessGate
from dataflow.control.lease_keeper import DEFAULT_LEASE_S
from dataflow.control.ledger import open_ledger
from dataflow.control.producer import ProducerSide
from dataflow.control.window import WindowShape


class Controller:
    """Builds the producer side and each rank's consumer side over one ledger.

    ``aborter`` is how the control plane frees features it no longer needs (dropped samples,
    released ones): the store, or anything with the contracts' ``SampleAborter.abort``.
    """

    def __init__(self, ledger: Ledger, *, aborter: SampleAborter | None = None) -> None:
        self.ledger = ledger
        self.aborter = aborter

    @classmethod
    def open(cls, uri: str, *, aborter: SampleAborter | None = None, **options: Any) -> Controller:
        """A controller over the ledger at ``uri`` (see ``open_ledger`` for the options)."""
        return cls(open_ledger(uri, **options), aborter=aborter)

    def wait_for_quantum(self, timeout: float | None = None, *, poll_s: float = 0.05) -> int:
        """Block until the consumer has opened the run and set its quantum; return it.

        Raises ``RunFailedError`` if the consumer FAILED meanwhile and ``TimeoutError`` after
        ``timeout`` seconds. A producer calls this before building its flow control.
        """
        limit = optional_timeout("Controller.wait_for_quantum", timeout)
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            markers = self.ledger.markers()
            if markers.quantum > 0:
                return markers.quantum
            if markers.consumer == ConsumerState.FAILED:
                raise RunFailedError(
                    f"the consumer failed before setting the quantum ({markers.consumer_reason})"
                )
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"the consumer set no quantum within {limit}s")
            time.sleep(poll_s)

    def producer(
        self,
        *,
        flow_limits: FlowLimits | None = None,
        admission: StalenessAdmission | None = None,
    ) -> ProducerSide:
        """The producer side; with ``flow_limits`` it applies flow control at the run's quantum.

        Flow control needs the quantum, so the consumer must have opened the run first
        (``LedgerConflictError`` otherwise).
        """
        flow = None
        if flow_limits is not None:
            quantum = self.ledger.markers().quantum
            if quantum <= 0:
                raise LedgerConflictError(
                    "flow control needs the run's quantum, which the consumer sets when it "
                    "opens the run; it is not set yet"
                )
            flow = FlowControl(self.ledger, flow_limits, quantum)
        return ProducerSide(self.ledger, flow=flow, admission=admission)

    def consumer(
        self,
        shape: WindowShape,
        *,
        rank: int = 0,
        collective: Collective | None = None,
        release: ReleasePolicy | str = ReleasePolicy.ON_CHECKPOINT,
        gate: StalenessGate | None = None,
        idle_timeout_s: float | None = None,
        lookahead: int = 2,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> ConsumerSide:
        """One data-parallel rank's consumer side (rank 0 dispatches the windows)."""
        return ConsumerSide(
            self.ledger,
            shape,
            rank=rank,
            collective=collective,
            aborter=self.aborter,
            release=release,
            gate=gate,
            idle_timeout_s=idle_timeout_s,
            lookahead=lookahead,
            lease_s=lease_s,
        )

    def status(self) -> LedgerStatus:
        """The ledger's status (counts, backlog, in-flight bytes, markers); cheap at any size."""
        return self.ledger.status()

    def close(self) -> None:
        """Close the ledger."""
        self.ledger.close()
