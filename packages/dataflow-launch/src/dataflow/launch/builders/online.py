"""Online builders: the rollout producer role, the trainer (consumer) role, and both
interleaved in one process (colocated online). All three share one ledger and one store per
run; the consumer side is the same code in every topology.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from dataflow.contracts import FeatureStore, InvalidInputError, Ledger, RefQueue
from dataflow.contracts.states import clip_reason
from dataflow.control import ConsumerSide, Controller, WindowShape, run_on_rank0
from dataflow.launch.builders.common import (
    load_run_prompts,
    open_plan_ledger,
    open_run_store,
    trainer_objective,
)
from dataflow.launch.builders.progress import LedgerBar, prompts_done
from dataflow.launch.builders.ranks import RankLayout, rank_layout
from dataflow.launch.builders.roles import ControlPlan, control_plan
from dataflow.launch.builders.staleness import (
    WaitingQueue,
    consumer_gate,
    draft_versions,
    publish_hook,
    staleness_metrics,
)
from dataflow.launch.builders.trainer_path import (
    RefSource,
    TrainOutcome,
    latest_checkpoint_step,
    train_draft,
    write_trainer_report,
)
from dataflow.launch.config import LaunchConfig
from dataflow.launch.engines import TargetEngine
from dataflow.launch.producer import (
    ProducerReport,
    RolloutProducer,
    build_producer,
    open_run_engine,
)
from dataflow.launch.producer.versions import DraftVersions
from dataflow.launch.run_dir import RunDir, write_json_atomic

T = TypeVar("T")


@dataclass
class OnlineProducer:
    """An opened rollout producer with its prompts ingested (``run`` it, then ``close``)."""

    producer: RolloutProducer
    engine: TargetEngine
    total_tasks: int
    versions: DraftVersions

    def stop(self) -> None:
        """Ask the producer to stop (also ends a wait for the first draft version)."""
        self.versions.stop()
        self.producer.stop()

    def close(self) -> None:
        self.engine.close()


def start_producer(config: LaunchConfig, ledger: Ledger, store: FeatureStore) -> OnlineProducer:
    """Open the engine and a producer on ``ledger``/``store``, ingest the prompt tasks.

    A restarted producer re-ingests (known tasks are duplicates) and continues.
    """
    engine = open_run_engine(config)
    try:
        prompts = load_run_prompts(config, engine.tokenizer, engine.info.version)  # type: ignore[attr-defined]
        versions = draft_versions(config, ledger)
        producer = build_producer(config, engine, ledger, store, draft_version=versions)
        producer.open()
        producer.ingest(prompts.tasks)
    except BaseException:
        engine.close()
        raise
    return OnlineProducer(producer, engine, len(prompts.tasks), versions)


def write_producer_report(run_dir: RunDir, report: ProducerReport, total_tasks: int) -> None:
    """``producer.json``: what this producer run committed, and how fast."""
    write_json_atomic(
        run_dir.producer_report,
        {
            "outcome": report.outcome,
            "tasks": total_tasks,
            "samples": report.committed,
            "tokens": report.tokens,
            "seconds": round(report.seconds, 3),
            "tokens_per_s": round(report.tokens_per_s, 1),
        },
    )


def write_plane_report(
    run_dir: RunDir, config: LaunchConfig, plan: ControlPlan, ledger: Ledger, store: FeatureStore
) -> None:
    """``plane.json``: the control plane a colocated run ran on, read from the live objects
    (the ledger's backend and durability, the release policy, whether a read frees a feature,
    and the features still resident at the end).
    """
    write_json_atomic(
        run_dir.plane_report,
        {
            "deployment_mode": config.deployment_mode.value,
            "ledger": plan.ledger_uri,
            "ledger_backend": ledger.status().backend,
            "ledger_durable": ledger.durable,
            "release": plan.release.value,
            "store_retains_on_release": bool(plan.trainer_store_options["retain_on_release"]),
            "resident_features_at_end": store.health().resident_samples,
        },
    )


def produce_online(
    config: LaunchConfig, run_dir: RunDir, *, progress: bool = True
) -> ProducerReport:
    """The producer role of a disaggregated online run: capture every task, commit its ref,
    close the stream. Restartable on the same ledger.
    """
    plan = control_plan(config, leases_prompts=True)
    ledger = open_plan_ledger(config, plan)
    store = open_run_store(config)
    try:
        online = start_producer(config, ledger, store)
        try:
            bar = LedgerBar(
                plan.ledger_uri, online.total_tasks, "Producing", prompts_done, enabled=progress
            )
            with bar:
                report = online.producer.run()
        finally:
            online.close()
        write_producer_report(run_dir, report, online.total_tasks)
        return report
    finally:
        store.close()
        ledger.close()


def _consumer_side(
    config: LaunchConfig, ledger: Ledger, store: FeatureStore, layout: RankLayout, plan: ControlPlan
) -> ConsumerSide:
    t = config.trainer
    # Windows are cut over the data-parallel groups: the sequence-parallel peers of a group read
    # that group's queue together (same refs, same order) and only the first reports its ids.
    shape = WindowShape(layout.data_world, t.batch_size, t.accumulation_steps)
    return Controller(ledger, aborter=store).consumer(
        shape,
        rank=layout.data_rank,
        collective=layout.collective,
        release=plan.release,
        gate=consumer_gate(config, ledger, store),
        lease_s=config.ledger.consumer_lease_s,
    )


def _train_on(
    config: LaunchConfig,
    run_dir: RunDir,
    ledger: Ledger,
    store: FeatureStore,
    consumer: ConsumerSide,
    layout: RankLayout,
    plan: ControlPlan,
    *,
    resume: bool,
    progress: bool,
) -> Callable[[RefQueue], TrainOutcome]:
    objective = trainer_objective(config, sequence_parallel=layout.exchange)
    publisher = publish_hook(config, ledger, run_dir.root)

    def train(refs: RefQueue) -> TrainOutcome:
        return train_draft(
            config,
            run_dir,
            objective,
            store,
            RefSource(queue=WaitingQueue(refs, ledger)),
            consumer.ack,
            layout,
            durable=consumer.checkpoint_durable if plan.tracks_checkpoints else None,
            resume=resume,
            progress=progress,
            extra_hooks=() if publisher is None else (publisher,),
            extra_metrics=staleness_metrics(consumer.gate),
        )

    return train


def _settled(consumer: ConsumerSide, run: Callable[[], T]) -> T:
    """Run ``run``; mark the consumer DONE after it, or FAILED with the reason if it raised."""
    try:
        outcome = run()
    except BaseException as exc:
        try:
            consumer.fail(clip_reason(f"{type(exc).__name__}: {exc}"))
        except Exception as marker_error:  # the run's own error stays the one raised
            exc.add_note(f"marking the consumer failed also failed: {marker_error}")
        raise
    consumer.finish()
    return outcome


def consume_online(
    config: LaunchConfig, run_dir: RunDir, *, resume: bool, progress: bool = True
) -> TrainOutcome:
    """The consumer (trainer) role of a disaggregated online run, on one rank or each rank of a
    torchrun job: open (or rejoin) the run, reconcile with the newest checkpoint on resume,
    train from the rank's queue until the producer's stream ends, mark the consumer done.
    """
    plan = control_plan(config, leases_prompts=False)
    layout = rank_layout(config)
    clean = False
    try:
        ledger = open_plan_ledger(config, plan)
        store = open_run_store(config, **plan.trainer_store_options)
        try:
            consumer = _consumer_side(config, ledger, store, layout, plan)
            consumer.open(config.run.id, resume=True)
            if resume:
                consumer.reconcile(latest_checkpoint_step(run_dir, layout, config.run.id))
            train = _train_on(
                config,
                run_dir,
                ledger,
                store,
                consumer,
                layout,
                plan,
                resume=resume,
                progress=progress,
            )
            queue = consumer.queue()
            outcome = _settled(consumer, lambda: train(queue))
        finally:
            store.close()
            ledger.close()
        run_on_rank0(
            layout.collective,
            "writing the trainer report",
            lambda: write_trainer_report(run_dir, outcome),
        )
        clean = True
        return outcome
    finally:
        layout.close(clean)


def run_colocated_online(
    config: LaunchConfig, run_dir: RunDir, *, resume: bool = False, progress: bool = True
) -> TrainOutcome:
    """Colocated online in one process: the rollout producer on a background thread, the
    trainer on this thread, one in-process ledger and store; the shutdown paths are those of
    :func:`dataflow.launch.interleave.run_interleaved` (no thread outlives the call).
    """
    from dataflow.launch.interleave import run_interleaved

    if resume:
        raise InvalidInputError(
            "a colocated_online run keeps its ledger in memory and cannot be resumed; "
            "use a disaggregated_online config for resumable online runs"
        )
    plan = control_plan(config, leases_prompts=True)
    layout = rank_layout(config)
    ledger = open_plan_ledger(config, plan)
    store = open_run_store(config, **plan.trainer_store_options)
    try:
        # The consumer opens the run first: it sets the quantum the producer's flow control needs.
        consumer = _consumer_side(config, ledger, store, layout, plan)
        consumer.open(config.run.id, resume=True)
        train = _train_on(
            config, run_dir, ledger, store, consumer, layout, plan, resume=False, progress=progress
        )
        online = start_producer(config, ledger, store)
        try:
            outcome = _settled(
                consumer,
                lambda: run_interleaved(
                    lambda _stop: online.producer.run(),
                    train,
                    consumer.queue(),
                    on_stop=online.stop,
                ),
            )
        finally:
            online.close()
        if outcome.produced is not None:
            write_producer_report(run_dir, outcome.produced, online.total_tasks)
        write_trainer_report(run_dir, outcome.trained)
        write_plane_report(run_dir, config, plan, ledger, store)
        return outcome.trained
    finally:
        store.close()
        ledger.close()
