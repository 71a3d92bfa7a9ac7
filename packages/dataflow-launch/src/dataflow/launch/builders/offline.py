"""Offline builders: training from a retained feature set, epoch after epoch.

- colocated offline: feature files (``file://``) → refs → the trainer, in one process;
- disaggregated offline: a producer process captures features into a cross-process store
  (``dir://``, ``mooncake://``) and writes ``manifest.json``; a consumer process trains from it.

Offline refs belong to a retained dataset, so windows are acked across ranks and audited in
``trained.jsonl`` but never marked TRAINED in a ledger (a sample is trained once per epoch).
"""

from __future__ import annotations

import time
from pathlib import Path

from dataflow.contracts import (
    ConsumerState,
    InvalidInputError,
    ProducerState,
    RunFailedError,
    SampleRef,
)
from dataflow.contracts.codec import decode, encode
from dataflow.contracts.states import clip_reason
from dataflow.contracts.uris import parse_store_uri
from dataflow.control import run_on_rank0
from dataflow.launch.builders.common import (
    load_run_prompts,
    open_plan_ledger,
    open_run_store,
    trainer_objective,
)
from dataflow.launch.builders.features import (
    capture_feature_files,
    check_precomputed,
    has_feature_files,
)
from dataflow.launch.builders.offline_staleness import read_file_targets, screen_offline_refs
from dataflow.launch.builders.online import write_producer_report
from dataflow.launch.builders.progress import LedgerBar, prompts_done
from dataflow.launch.builders.ranks import rank_layout
from dataflow.launch.builders.roles import control_plan
from dataflow.launch.builders.trainer_path import (
    RefSource,
    TrainOutcome,
    train_draft,
    write_trainer_report,
)
from dataflow.launch.config import LaunchConfig
from dataflow.launch.producer import (
    ProducerReport,
    ProducerSettings,
    RolloutProducer,
    open_run_engine,
)
from dataflow.launch.run_dir import RunDir, read_json, write_json_atomic
from dataflow.store import open_store
from dataflow.train.hooks import RetainedAck

MANIFEST_VERSION = 1


def _train_refs(
    config: LaunchConfig,
    run_dir: RunDir,
    refs: list[SampleRef],
    store_uri: str,
    store_options: dict[str, object],
    *,
    resume: bool,
    progress: bool,
) -> TrainOutcome:
    layout = rank_layout(config)
    clean = False
    try:
        objective = trainer_objective(config, sequence_parallel=layout.exchange)
        store = open_store(store_uri, **store_options)
        try:
            outcome = train_draft(
                config,
                run_dir,
                objective,
                store,
                RefSource(refs=refs, num_epochs=config.data.passes),
                RetainedAck(layout.collective),
                layout,
                resume=resume,
                progress=progress,
            )
        finally:
            store.close()
        run_on_rank0(
            layout.collective,
            "writing the trainer report",
            lambda: write_trainer_report(run_dir, outcome),
        )
        clean = True
        return outcome
    finally:
        layout.close(clean)


def run_colocated_offline(
    config: LaunchConfig, run_dir: RunDir, *, resume: bool, progress: bool = True
) -> TrainOutcome:
    """Colocated offline: train ``data.passes`` epochs over the feature files under the
    ``file://`` store (captured once with the target first when the directory has none).
    """
    directory = Path(parse_store_uri(config.store.uri).location)
    check_precomputed(config, directory)
    if not has_feature_files(directory):
        capture_feature_files(config, directory, progress=progress)
    refs = open_store(config.store.uri).refs()  # type: ignore[attr-defined]
    if not refs:
        raise InvalidInputError(f"{config.store.uri} holds no feature files")
    refs = screen_offline_refs(config, run_dir, refs, read_file_targets(directory))
    # The lightweight plane: the run's ledger is noop:// (config load refuses any other), which
    # validates the run's markers and retains nothing, so the run does no ledger I/O.
    ledger = open_plan_ledger(config, control_plan(config, leases_prompts=False))
    try:
        ledger.open_run(config.run.id, config.trainer.quantum, resume=True)
        ledger.set_consumer_state(ConsumerState.RUNNING)
        try:
            outcome = _train_refs(
                config, run_dir, refs, config.store.uri, {}, resume=resume, progress=progress
            )
        except BaseException as exc:
            ledger.set_consumer_state(
                ConsumerState.FAILED, clip_reason(f"{type(exc).__name__}: {exc}")
            )
            raise
        ledger.set_consumer_state(ConsumerState.DONE)
        return outcome
    finally:
        ledger.close()


def produce_offline(
    config: LaunchConfig, run_dir: RunDir, *, progress: bool = True
) -> ProducerReport:
    """The producer of a disaggregated offline run: capture every prompt once into the shared
    store (restartable: DONE prompts are not captured again), then write ``manifest.json``.
    No backpressure: the whole feature set is meant to be resident for the epochs.
    """
    plan = control_plan(config, leases_prompts=True)
    ledger = open_plan_ledger(config, plan)
    store = open_run_store(config)
    engine = open_run_engine(config)
    try:
        prompts = load_run_prompts(
            config.model_copy(update={"data": config.data.model_copy(update={"passes": 1})}),
            engine.tokenizer,  # type: ignore[attr-defined]
            engine.info.version,
        )
        producer = RolloutProducer(ledger, store, engine, ProducerSettings.from_config(config))
        producer.open()
        producer.ingest(prompts.tasks)
        bar = LedgerBar(
            plan.ledger_uri, len(prompts.tasks), "Ingesting", prompts_done, enabled=progress
        )
        with bar:
            report = producer.run()
        refs = ledger.refs([t.task_id for t in prompts.tasks])
        write_json_atomic(
            run_dir.manifest,
            {
                "version": MANIFEST_VERSION,
                "run_id": config.run.id,
                "store_uri": config.store.uri,
                "refs": [encode(ref) for ref in sorted(refs, key=lambda r: r.sample_id)],
            },
        )
        write_producer_report(run_dir, report, len(prompts.tasks))
        return report
    finally:
        engine.close()
        store.close()
        ledger.close()


def wait_for_manifest(
    config: LaunchConfig, run_dir: RunDir, poll_s: float = 0.5
) -> list[SampleRef]:
    """The manifest's refs, waiting while the producer runs; a FAILED producer raises
    ``RunFailedError`` with its reason instead of waiting for ever.
    """
    plan = control_plan(config, leases_prompts=False)
    ledger = open_plan_ledger(config, plan)
    try:
        while not run_dir.manifest.is_file():
            markers = ledger.markers()
            if markers.producer is ProducerState.FAILED:
                raise RunFailedError(f"the producer failed: {markers.producer_reason}")
            time.sleep(poll_s)
    finally:
        ledger.close()
    data = read_json(run_dir.manifest)
    if data.get("version") != MANIFEST_VERSION or data.get("run_id") != config.run.id:
        raise InvalidInputError(
            f"{run_dir.manifest} belongs to run {data.get('run_id')!r} (version "
            f"{data.get('version')!r}), not to run {config.run.id!r}"
        )
    return [decode(item, SampleRef) for item in data["refs"]]


def consume_offline(
    config: LaunchConfig, run_dir: RunDir, *, resume: bool, progress: bool = True
) -> TrainOutcome:
    """The consumer of a disaggregated offline run: ``data.passes`` epochs over the manifest's
    refs, read from the shared store with retain-on-release.
    """
    refs = screen_offline_refs(config, run_dir, wait_for_manifest(config, run_dir))
    from dataflow.launch.producer import store_options

    options: dict[str, object] = {**store_options(config), "retain_on_release": True}
    return _train_refs(
        config, run_dir, refs, config.store.uri, options, resume=resume, progress=progress
    )
