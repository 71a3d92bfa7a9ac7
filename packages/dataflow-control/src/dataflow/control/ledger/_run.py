"""Run markers, the weight-version registry and ``status()``, written once over ``LedgerTx``."""

from __future__ import annotations

import dataclasses
from typing import Any

from dataflow.contracts.errors import InvalidInputError
from dataflow.contracts.states import (
    ConsumerState,
    LedgerStatus,
    ProducerState,
    PromptState,
    RunMarkers,
    SampleState,
)
from dataflow.contracts.weights import WeightVersion
from dataflow.control.ledger._meta import (
    IN_FLIGHT_BYTES,
    WEIGHTS,
    dropped_reasons,
    prompt_counter,
    sample_counter,
)
from dataflow.control.ledger._rules import conflict
from dataflow.control.ledger._tx import LedgerTx


def open_run(tx: LedgerTx, run_id: str, quantum: int, resume: bool) -> RunMarkers:
    """Start a run on an empty ledger, or (``resume``) continue the ledger's run."""
    meta = tx.run_meta()
    counters = tx.counters()
    samples = sum(counters.get(sample_counter(s), 0) for s in SampleState)
    prompts = sum(counters.get(prompt_counter(s), 0) for s in PromptState)
    if not resume and (meta.run_id or samples or prompts):
        held = f"run {meta.run_id!r}" if meta.run_id else "no run marker"
        raise conflict(
            "open_run(resume=False)",
            [
                f"the ledger is not empty ({held}, {samples} samples, {prompts} prompts); "
                "pass resume=True to continue its run, or open a new ledger"
            ],
        )
    if meta.run_id and run_id != meta.run_id:
        raise conflict(
            "open_run", [f"the ledger belongs to run {meta.run_id!r}, not to {run_id!r}"]
        )
    if meta.quantum and quantum and quantum != meta.quantum:
        raise conflict(
            "open_run",
            [f"quantum {quantum} differs from the run's quantum {meta.quantum}, fixed for the run"],
        )
    updates: dict[str, Any] = {}
    if not meta.run_id:
        updates["run_id"] = run_id
    if not meta.quantum and quantum:
        updates["quantum"] = quantum
    if updates:
        meta, stored = meta.changes(**updates)
        tx.set_meta(stored)
    return meta.markers()


def markers(tx: LedgerTx) -> RunMarkers:
    """The run markers as stored."""
    return tx.run_meta().markers()


def _side_state(current: Any, target: Any, reason: str, done: Any, side: str) -> tuple[Any, str]:
    """Validate one side's marker change and return the state and reason to store."""
    if target is type(target).NOT_STARTED:
        raise InvalidInputError(f"the {side} state cannot be set back to not_started")
    if target.value == "failed" and not reason:
        raise InvalidInputError(f"a failed {side} needs a reason")
    if target is done and current is not done and current.value != "running":
        why = (
            "a failure never reads as a clean end"
            if current.value == "failed"
            else "it never started"
        )
        raise conflict(f"set_{side}_state", [f"the {side} is {current.value}: {why}"])
    return target, reason


def set_producer_state(tx: LedgerTx, state: ProducerState, reason: str) -> None:
    """RUNNING from any state, CLOSED only from RUNNING, FAILED(reason) from any state."""
    meta = tx.run_meta()
    new, why = _side_state(meta.producer, state, reason, ProducerState.CLOSED, "producer")
    tx.set_meta(meta.changes(producer=new, producer_reason=why)[1])


def set_consumer_state(tx: LedgerTx, state: ConsumerState, reason: str) -> None:
    """RUNNING from any state, DONE only from RUNNING, FAILED(reason) from any state."""
    meta = tx.run_meta()
    new, why = _side_state(meta.consumer, state, reason, ConsumerState.DONE, "consumer")
    tx.set_meta(meta.changes(consumer=new, consumer_reason=why)[1])


def set_durable_step(tx: LedgerTx, step: int) -> None:
    """Record the newest durable checkpoint step; it never goes backwards."""
    meta = tx.run_meta()
    if step < meta.durable_step:
        raise conflict(
            "set_durable_step",
            [f"step {step} is behind the durable step {meta.durable_step}"],
        )
    if step != meta.durable_step:
        tx.set_meta(meta.changes(durable_step=step)[1])


def declare_target(tx: LedgerTx, version: str) -> None:
    """Record the target model the producer now runs (the newest declaration wins)."""
    meta = tx.run_meta()
    if version != meta.target_version:
        tx.set_meta(meta.changes(target_version=version)[1])


def record_drift(tx: LedgerTx, mean_lag: float, max_lag: int) -> None:
    """Keep the staleness gate's latest rolling draft-lag figures."""
    meta = tx.run_meta()
    mean = repr(float(mean_lag))
    if (mean, max_lag) != (meta.drift_mean, meta.drift_max):
        tx.set_meta(meta.changes(drift_mean=mean, drift_max=max_lag)[1])


def publish_weight(tx: LedgerTx, version: WeightVersion) -> WeightVersion:
    """Append a version with the next publish order; idempotent on ``version_id``."""
    history = tx.weights()
    for known in history:
        if known.version_id == version.version_id:
            if dataclasses.replace(version, publish_order=known.publish_order) != known:
                raise conflict(
                    "publish_weight",
                    [f"version {version.version_id!r} was published with different fields"],
                )
            return known
    stored = dataclasses.replace(version, publish_order=len(history) + 1)
    tx.append_weight(stored)
    tx.add_counters({WEIGHTS: 1})
    return stored


def status(tx: LedgerTx, backend: str, durable: bool) -> LedgerStatus:
    """Counts per state, in-flight refs and bytes, drop reasons, markers: O(1) in history."""
    meta = tx.run_meta()
    counters = tx.counters()
    samples = {s.value: counters.get(sample_counter(s), 0) for s in SampleState}
    return LedgerStatus(
        backend=backend,
        durable=durable,
        markers=meta.markers(),
        samples=samples,
        prompts={p.value: counters.get(prompt_counter(p), 0) for p in PromptState},
        in_flight=samples[SampleState.COMMITTED.value] + samples[SampleState.ASSIGNED.value],
        in_flight_bytes=counters.get(IN_FLIGHT_BYTES, 0),
        dropped_reasons=dropped_reasons(counters),
        latest_weight_order=counters.get(WEIGHTS, 0),
        drift_mean=float(meta.drift_mean) if meta.drift_mean else None,
        drift_max=meta.drift_max if meta.drift_max >= 0 else None,
    )
