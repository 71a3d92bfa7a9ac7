"""The rollout producer: N worker threads over one ledger, one store and one target engine."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from dataflow.contracts import (
    CommitResult,
    FeatureStore,
    InvalidInputError,
    Ledger,
    PromptState,
    PromptTask,
    RunFailedError,
)
from dataflow.contracts.states import clip_reason
from dataflow.contracts.uris import parse_ledger_uri
from dataflow.control.flow import FlowLimits
from dataflow.control.gate import StalenessAdmission
from dataflow.control.producer import ProducerSide
from dataflow.launch.engines import TargetEngine
from dataflow.launch.producer.report import ProducerReport
from dataflow.launch.producer.settings import ProducerSettings
from dataflow.launch.producer.worker import RolloutWorker, pool_drained

log = logging.getLogger(__name__)


class RolloutProducer:
    """Leases prompts from the ledger, captures their features, puts them and commits refs.

    Guarantees:
    - ``open`` joins the run with the configured quantum (a different quantum is refused by
      the ledger), marks the producer RUNNING and takes back this producer's stale leases; a
      producer restarted on the same ledger continues where it stopped: ``ingest`` reports the
      prompts it already knows as duplicates, and DONE prompts are never leased again;
    - flow control (watermarks, byte cap) and staleness admission are obeyed before each put
      and each lease;
    - ``run`` returns a report when the pool drains (closing the stream when configured) or
      when ``stop`` was called (leases handed back, stream left open); it marks the producer
      FAILED with the reason and raises ``RunFailedError`` when every worker was dropped, a
      worker hit a fatal error, or more than ``max_failed_prompts`` prompts failed for good — a
      failure never reads as a clean end of stream.
    """

    def __init__(
        self,
        ledger: Ledger,
        store: FeatureStore,
        engine: TargetEngine,
        settings: ProducerSettings,
        *,
        flow_limits: FlowLimits | None = None,
        admission: Callable[[Ledger], StalenessAdmission] | None = None,
        draft_version: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._ledger = ledger
        self._store = store
        self._engine = engine
        self.settings = settings
        self._flow_limits = flow_limits
        self._admission_factory = admission
        self._draft_version = draft_version
        self._stop = threading.Event()
        self._side: ProducerSide | None = None
        self.workers: tuple[RolloutWorker, ...] = ()

    @property
    def side(self) -> ProducerSide:
        """The control plane's producer side (after ``open``)."""
        if self._side is None:
            raise InvalidInputError("RolloutProducer.open() must be called first")
        return self._side

    def open(self) -> None:
        """Join the run, mark the producer RUNNING, reclaim this producer's old leases."""
        from dataflow.control.controller import Controller

        if parse_ledger_uri(self._ledger.uri).scheme == "noop":
            raise InvalidInputError(
                f"the rollout producer leases prompts from its ledger, and {self._ledger.uri} "
                "retains none; use memory:// for a single-process run"
            )
        self._ledger.open_run(self.settings.run_id, self.settings.quantum, resume=True)
        admission = self._admission_factory(self._ledger) if self._admission_factory else None
        side = Controller(self._ledger).producer(flow_limits=self._flow_limits, admission=admission)
        side.open(self.settings.run_id, resume=True)
        self._ledger.declare_target(self._engine.info.version)
        for name in self.settings.worker_names:
            side.reclaim(name)
        self._side = side
        log.info(
            "producer joined run %s (workers %s, target %s)",
            self.settings.run_id,
            ", ".join(self.settings.worker_names),
            self._engine.info.version,
        )

    def ingest(self, tasks: Sequence[PromptTask]) -> CommitResult:
        """Queue prompt tasks; ids the ledger already knows are reported as duplicates."""
        return self.side.ingest(tasks)

    def stop(self) -> None:
        """Ask every worker to finish its current step and return (cooperative; idempotent)."""
        self._stop.set()

    def run(self) -> ProducerReport:
        """Run the workers to the end (see the class guarantees)."""
        side = self.side
        commit_lock = threading.Lock()
        self.workers = tuple(
            RolloutWorker(
                name,
                side=side,
                ledger=self._ledger,
                store=self._store,
                engine=self._engine,
                settings=self.settings,
                stop=self._stop,
                commit_lock=commit_lock,
                draft_version=self._draft_version,
            )
            for name in self.settings.worker_names
        )
        fatal: list[BaseException] = []
        start = time.monotonic()

        def guarded(worker: RolloutWorker) -> None:
            try:
                worker.run()
            except BaseException as exc:
                fatal.append(exc)
                self._stop.set()  # one fatal error stops the whole producer

        threads = [
            threading.Thread(target=guarded, args=(w,), name=f"rollout-{w.name}", daemon=True)
            for w in self.workers
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.monotonic() - start
        reports = tuple(w.report() for w in self.workers)
        if fatal:
            self._fail(f"producer worker error: {type(fatal[0]).__name__}: {fatal[0]}", fatal[0])
        if all(w.dropped for w in self.workers):
            errors = "; ".join(f"{r.name}: {r.last_error}" for r in reports)
            self._fail(f"all {len(reports)} producer workers failed ({errors})")
        if self._stop.is_set() or not pool_drained(self._ledger):
            return ProducerReport("stopped", seconds, reports)
        failed = self._ledger.status().prompts.get(PromptState.FAILED.value, 0)
        if failed > self.settings.max_failed_prompts:
            last = "; ".join(f"{r.name}: {r.last_error}" for r in reports if r.last_error)
            self._fail(
                f"{failed} prompt(s) failed for good, over the limit of "
                f"{self.settings.max_failed_prompts}" + (f" (last errors: {last})" if last else "")
            )
        if self.settings.close_when_drained:
            side.close()
            log.info("producer closed the stream after %.1fs: every prompt is done", seconds)
            return ProducerReport("closed", seconds, reports)
        return ProducerReport("drained", seconds, reports)

    def _fail(self, reason: str, cause: BaseException | None = None) -> None:
        log.error("producer FAILED: %s", reason)
        self.side.fail(clip_reason(reason))
        raise RunFailedError(reason) from cause
