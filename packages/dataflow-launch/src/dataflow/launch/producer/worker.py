"""One rollout worker: lease prompts → capture features → put them → commit refs.

Failure classes, each handled one way:
- a bad prompt (``InvalidInputError`` from the engine) or bad feature values (NaN/inf, no
  tokens, longer than ``max_length``, a loss mask not 0/1: ``BadFeatureValuesError`` from the
  engine's check, or the same check here for every engine) fails that prompt for good with the
  reason, before anything is put; in a batch the tasks are retried one by one so only the bad
  ones fail; the worker is not blamed;
- a failed capture or put (engine, transport, store) returns the batch's prompts to the ledger
  as retryable and counts against the worker; ``worker_max_failures`` in a row drop it;
- a ledger refusal of a commit is fatal for the producer (raised to it), after the features of
  every sample in the refused group are aborted so nothing leaks.

Group commit: the refs of one engine batch are committed together, in one ledger transaction
(all or none), once every sample of the batch is put. The group is committed early when flow
control has no room for the next sample (its held reservations could otherwise keep that room
from ever freeing up) and when the worker is stopped. A sample put but not committed — the
process dies, or the commit raises — is never half-visible: nothing of the group is in the
ledger, and its features are aborted (or, after SIGKILL, reclaimed by the store's owner rules).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from dataflow.contracts import (
    CapacityExceededError,
    FeatureStore,
    InvalidInputError,
    Ledger,
    LedgerConflictError,
    NotFoundError,
    PromptState,
    PromptTask,
    SampleRef,
)
from dataflow.contracts.states import clip_reason
from dataflow.control.flow import Admission
from dataflow.control.producer import ProducerSide
from dataflow.launch.engines import CapturedSample, TargetEngine
from dataflow.launch.engines.features import BadFeatureValuesError, length_problem, value_problem
from dataflow.launch.producer.report import WorkerReport
from dataflow.launch.producer.settings import ProducerSettings

log = logging.getLogger(__name__)

REFUSAL_LOG_EVERY_S = 10.0
"""A worker held back by staleness admission says why at most this often."""


def pool_drained(ledger: Ledger) -> bool:
    """No prompt is pending or leased: every prompt is DONE or FAILED."""
    prompts = ledger.status().prompts
    return prompts.get(PromptState.PENDING.value, 0) == 0 and (
        prompts.get(PromptState.LEASED.value, 0) == 0
    )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


@dataclasses.dataclass(frozen=True)
class _Put:
    """A sample in the store whose ref waits for its group's commit (its bytes still reserved)."""

    ref: SampleRef
    num_tokens: int
    admission: Admission


class RolloutWorker:
    """Runs the lease → capture → put → commit loop until the pool drains, it is stopped or
    dropped. Guarantees: every leased prompt ends committed, failed back to the ledger, or handed
    back at exit (``reclaim``); every put sample is committed or aborted.
    """

    def __init__(
        self,
        name: str,
        *,
        side: ProducerSide,
        ledger: Ledger,
        store: FeatureStore,
        engine: TargetEngine,
        settings: ProducerSettings,
        stop: threading.Event,
        commit_lock: threading.Lock,
        draft_version: Callable[[], str | None],
    ) -> None:
        self.name = name
        self._side = side
        self._ledger = ledger
        self._store = store
        self._engine = engine
        self._settings = settings
        self._stop = stop
        self._commit_lock = commit_lock
        self._draft_version = draft_version
        self._streak = 0
        self._tally: dict[str, Any] = dict.fromkeys(
            ("committed", "duplicates", "rejected", "failures", "tokens", "bytes"), 0
        )
        self._dropped = False
        self._last_error = ""
        self._refusal_logged = 0.0

    def report(self) -> WorkerReport:
        """The tallies so far."""
        return WorkerReport(
            self.name, dropped=self._dropped, last_error=self._last_error, **self._tally
        )

    @property
    def dropped(self) -> bool:
        """Whether the worker gave up after too many failures in a row."""
        return self._dropped

    def run(self) -> None:
        """The loop; returns when drained, stopped or dropped. Fatal errors propagate."""
        try:
            while not self._stop.is_set() and not self._dropped:
                draft = self._draft_version()
                tasks = self._side.lease(
                    self.name,
                    self._settings.prompts_per_lease,
                    self._settings.lease_s,
                    draft_version=draft,
                    target_version=self._engine.info.version,
                )
                if tasks:
                    log.debug(
                        "producer worker %s leased %d prompt(s): %s",
                        self.name,
                        len(tasks),
                        ", ".join(t.task_id for t in tasks),
                    )
                    self._process(tasks, draft)
                elif pool_drained(self._ledger):
                    log.debug("producer worker %s: the prompt pool is drained", self.name)
                    return
                else:  # peers hold the rest, or admission refused: look again shortly
                    self._note_refusal()
                    self._stop.wait(self._settings.poll_s)
        finally:
            self._side.reclaim(self.name)

    def _note_refusal(self) -> None:
        refusal = self._side.last_refusal
        now = time.monotonic()
        if refusal is not None and now - self._refusal_logged >= REFUSAL_LOG_EVERY_S:
            self._refusal_logged = now
            log.warning(
                "producer worker %s holds back (staleness.admission): a rollout started now "
                "would arrive with draft lag %s (%s); waiting for the trainer to catch up",
                self.name,
                refusal.draft_lag,
                refusal.reason,
            )

    def _process(self, tasks: Sequence[PromptTask], draft: str | None) -> None:
        try:
            samples = self._engine.capture(tasks)
        except (InvalidInputError, BadFeatureValuesError) as exc:
            if len(tasks) == 1:
                self._fail(tasks[0], _describe(exc), retryable=False)
                self._tally["rejected"] += 1
            else:
                for task in tasks:  # isolate the bad prompt(s); the others still run
                    self._process([task], draft)
            return
        except Exception as exc:  # engine or transport trouble: the prompts are not to blame
            self._blame(tasks, exc)
            return
        group: list[_Put] = []
        try:
            for index, (task, sample) in enumerate(zip(tasks, samples, strict=True)):
                if self._stop.is_set():
                    for rest_task, rest in zip(tasks[index:], samples[index:], strict=True):
                        self._discard_staged(rest_task, rest)
                    break  # unfinished leases are handed back by run(); the put ones commit
                limit = self._settings.max_length
                # An engine's checked sample had its values read already; only the run's
                # max_length is new here (shapes only).
                problem = (
                    length_problem(sample.tensors, limit)
                    if sample.values_checked
                    else value_problem(sample.tensors, limit)
                )
                if sample.written is not None and limit is not None and sample.num_tokens > limit:
                    # Server-written features: their length is known from the specs (their
                    # values are checked by the trainer's loader, which reads them).
                    problem = (
                        f"bad_features: {sample.num_tokens} tokens, longer than max_length {limit}"
                    )
                if problem is not None:
                    self._discard_staged(task, sample)
                    self._fail(task, f"task {task.task_id!r}: {problem}", retryable=False)
                    self._tally["rejected"] += 1
                    continue
                put = self._put(task, sample, draft, group)
                if put is not None:
                    group.append(put)
        except BaseException:
            self._abandon(group, "producer stopped before the commit")
            raise
        self._commit_group(group)
        self._streak = 0

    def _fail(self, task: PromptTask, reason: str, *, retryable: bool) -> None:
        # A conflict means the lease expired and was taken over: its new holder owns the prompt.
        with contextlib.suppress(LedgerConflictError):
            self._side.fail_prompt(
                task.task_id, self.name, clip_reason(reason), retryable=retryable
            )

    def _blame(self, tasks: Sequence[PromptTask], exc: BaseException) -> None:
        reason = _describe(exc)
        for task in tasks:
            self._fail(task, reason, retryable=True)
        self._streak += 1
        self._tally["failures"] += 1
        self._last_error = reason
        log.warning(
            "producer worker %s: %d prompt(s) returned for retry (failure %d in a row): %s",
            self.name,
            len(tasks),
            self._streak,
            reason,
        )
        if self._streak >= self._settings.worker_max_failures:
            self._dropped = True
            log.error(
                "producer worker %s gave up after %d failures in a row", self.name, self._streak
            )

    def _committed(self, sample_id: str) -> bool:
        try:
            return bool(self._ledger.refs([sample_id]))
        except NotFoundError:
            return False

    def _wait_for_capacity(self, nbytes: int, group: list[_Put]) -> Admission | None:
        if group:  # room now? else commit the group first: its reservations may be the blocker
            try:
                return self._side.wait_for_capacity(nbytes, timeout=0)
            except TimeoutError:
                self._commit_group(group)
        while not self._stop.is_set():
            try:
                return self._side.wait_for_capacity(nbytes, timeout=self._settings.poll_s)
            except TimeoutError:
                continue
        return None

    def _put(
        self, task: PromptTask, sample: CapturedSample, draft: str | None, group: list[_Put]
    ) -> _Put | None:
        """Put one sample's features; returns what its commit needs, or None if it is not to be
        committed (a duplicate, refused, or a failed put — each already accounted for).
        """
        sample_id = task.task_id
        if self._committed(sample_id):
            # A peer that took over our expired lease committed it first; putting now would
            # replace the generation its committed ref points at.
            self._tally["duplicates"] += 1
            self._discard_staged(task, sample)
            return None
        try:
            admission = self._wait_for_capacity(sample.nbytes, group)
        except CapacityExceededError as exc:  # this sample can never fit under the byte cap
            self._discard_staged(task, sample)
            self._fail(task, _describe(exc), retryable=False)
            self._tally["rejected"] += 1
            return None
        if admission is None:
            self._discard_staged(task, sample)
            return None
        metadata = {
            "num_tokens": sample.num_tokens,
            "worker": self.name,
            "attempt": task.attempt,
            **{k: v for k, v in task.metadata.items() if k in ("pass", "line")},
        }
        try:
            if sample.written is None:
                ref = self._store.put(sample_id, dict(sample.tensors), metadata)
            else:
                ref = self._adopt(sample_id, sample, metadata)
        except Exception as exc:  # store full or unreachable: retry the prompt later
            admission.release()
            if sample.written is not None:  # remove what the server wrote (hard-pinned)
                with contextlib.suppress(Exception):
                    self._store.abort(sample_id, clip_reason(f"adoption refused: {exc}"))
            self._blame([task], exc)
            return None
        except BaseException:
            admission.release()
            raise
        ref = dataclasses.replace(
            ref,
            source_task_id=task.task_id,
            run_id=self._settings.run_id,
            target_version=self._engine.info.version,
            draft_weight_version=draft,
            num_tokens=sample.num_tokens,
            estimated_bytes=max(ref.estimated_bytes, sample.nbytes),
        )
        return _Put(ref, sample.num_tokens, admission)

    def _discard_staged(self, task: PromptTask, sample: CapturedSample) -> None:
        """Remove a sample the vLLM connector staged that will not be adopted (store mode)."""
        if sample.written is not None and sample.written.layout == "staged":
            with contextlib.suppress(Exception):  # gc reclaims it once this process is gone
                self._store.unstage(  # type: ignore[attr-defined]
                    task.task_id, sample.written.generation
                )

    def _adopt(self, sample_id: str, sample: CapturedSample, metadata: dict[str, Any]) -> SampleRef:
        """Commit-ready ref for features a capture server already wrote (no put, no copy)."""
        if sample.written is not None and sample.written.layout == "staged":
            staged: SampleRef = self._store.adopt(  # type: ignore[attr-defined]
                sample_id, sample.written.generation, sample.written.specs, metadata
            )
            return staged
        adopt = getattr(self._store, "adopt_external", None)
        if adopt is None or sample.written is None:
            raise InvalidInputError(  # short: it ends up in the ledger's 200-character reason
                f"target.capture mooncake needs a mooncake:// store; {type(self._store).__name__} "
                "cannot adopt"
            )
        ref: SampleRef = adopt(sample_id, sample.written.generation, sample.written.specs, metadata)
        return ref

    def _abandon(self, group: list[_Put], reason: str) -> None:
        """Abort every put of ``group`` (none of it is in the ledger) and free its bytes."""
        for put in group:
            with contextlib.suppress(Exception):  # abort the rest even if one abort fails
                self._store.abort(put.ref.sample_id, reason)
            put.admission.release()
        group.clear()

    def _commit_group(self, group: list[_Put]) -> None:
        """Commit ``group``'s refs in one ledger transaction, then free their reservations (the
        ledger's in-flight bytes account for them from then on); a refusal aborts them all.
        """
        if not group:
            return
        try:
            with self._commit_lock:
                result = self._side.commit([put.ref for put in group])
        except BaseException:
            self._abandon(group, "commit refused")
            raise
        committed = set(result.committed)
        for put in group:
            put.admission.release()
            if put.ref.sample_id in committed:
                self._tally["committed"] += 1
                self._tally["tokens"] += put.num_tokens
                self._tally["bytes"] += put.ref.estimated_bytes
            else:
                self._tally["duplicates"] += 1
        log.debug(
            "producer worker %s committed %d ref(s) (%d duplicate(s))",
            self.name,
            len(result.committed),
            len(result.duplicates),
        )
        group.clear()
