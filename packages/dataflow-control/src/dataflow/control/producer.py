"""ProducerSide: what the rollout producer needs from the ledger.

Prompts in, leases out, refs committed, and the producer's run marker — which is how every
consumer learns, through the ledger, whether the stream ended cleanly (CLOSED) or not (FAILED).
A restarted producer on the same ledger continues: finished prompts are DONE in the ledger
(committing a sample marks its prompt DONE in the same transaction) and are never leased again.
"""

from __future__ import annotations

from collections.abc import Sequence

from dataflow.contracts.features import SampleRef
from dataflow.contracts.prompt import PromptTask
from dataflow.contracts.protocols import Ledger
from dataflow.contracts.states import CommitResult, ProducerState, PromptState, RunMarkers
from dataflow.control.flow import Admission, FlowControl
from dataflow.control.gate import StalenessAdmission
from dataflow.control.staleness import StalenessAssessment


class ProducerSide:
    """The producer's view of one run.

    Guarantees: ``lease`` refuses to start work the staleness admission judges too stale
    (returns no tasks and records the verdict in ``last_refusal``); ``wait_for_capacity``
    applies the flow control read from the ledger; ``close`` and ``fail`` are the only ways the
    stream ends, and a failure is never turned into a clean end.
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        flow: FlowControl | None = None,
        admission: StalenessAdmission | None = None,
    ) -> None:
        self._ledger = ledger
        self.flow = flow
        self.admission = admission
        self.last_refusal: StalenessAssessment | None = None

    def open(self, run_id: str, *, resume: bool = False) -> RunMarkers:
        """Open (or, with ``resume``, join/continue) the run and mark the producer RUNNING."""
        self._ledger.open_run(run_id, 0, resume=resume)
        self._ledger.set_producer_state(ProducerState.RUNNING)
        return self._ledger.markers()

    def reclaim(self, worker: str) -> list[str]:
        """A restarted ``worker`` hands back its leases (they go back to PENDING)."""
        return self._ledger.reclaim_leases(worker)

    def ingest(self, tasks: Sequence[PromptTask]) -> CommitResult:
        """Add prompt tasks (a known task id is reported as a duplicate, never queued twice)."""
        return self._ledger.add_prompts(tasks)

    def lease(
        self,
        worker: str,
        limit: int,
        lease_s: float,
        *,
        draft_version: str | None = None,
        target_version: str = "unknown",
    ) -> list[PromptTask]:
        """Lease up to ``limit`` prompts, unless admission says the rollout would arrive stale."""
        if self.admission is not None:
            verdict = self.admission.assess(draft_version, target_version)
            if not verdict.accept:
                self.last_refusal = verdict
                return []
            self.last_refusal = None
        return self._ledger.lease_prompts(worker, limit, lease_s)

    def prompts_drained(self) -> bool:
        """True when no prompt is PENDING or LEASED (a lease may still come back retryable)."""
        prompts = self._ledger.status().prompts
        pending = prompts.get(PromptState.PENDING.value, 0)
        return pending == 0 and prompts.get(PromptState.LEASED.value, 0) == 0

    def complete(self, task_id: str, worker: str) -> PromptState:
        """The prompt is done without a sample (e.g. captured by a peer)."""
        return self._ledger.complete_prompt(task_id, worker)

    def fail_prompt(
        self, task_id: str, worker: str, reason: str, *, retryable: bool
    ) -> PromptState:
        """The rollout failed; retryable failures go back to PENDING until attempts run out."""
        return self._ledger.fail_prompt(task_id, worker, reason, retryable=retryable)

    def wait_for_capacity(self, nbytes: int = 0, timeout: float | None = None) -> Admission:
        """Block until flow control admits ``nbytes`` of new work (no flow control: at once)."""
        if self.flow is None:
            return Admission(None, nbytes)
        return self.flow.wait_for_capacity(nbytes, timeout)

    def commit(self, refs: Sequence[SampleRef]) -> CommitResult:
        """Commit refs (one transaction; duplicates reported, never delivered twice)."""
        return self._ledger.commit(refs)

    def close(self) -> None:
        """The stream ended cleanly: every sample there will be is committed."""
        self._ledger.set_producer_state(ProducerState.CLOSED)

    def fail(self, reason: str) -> None:
        """The producer failed: consumers raise ``RunFailedError`` instead of ending."""
        self._ledger.set_producer_state(ProducerState.FAILED, reason)
