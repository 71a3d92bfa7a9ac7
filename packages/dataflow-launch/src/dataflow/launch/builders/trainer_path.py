"""The one trainer path every topology converges on.

Refs (a fixed list or a rank's queue) → ``FeatureDataLoader`` → ``Trainer`` with train's
``AckHook`` (the one ack seam, docs/architecture.md §7) writing ``trained.jsonl`` once each ack
returned → checkpoints, ``metrics.jsonl``. Builders differ only in the ref source, the store and
the ack (and durable) functions they pass in; nothing here looks at the topology.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dataflow.contracts import FeatureStore, InvalidInputError, RefQueue, SampleRef
from dataflow.control import run_on_rank0
from dataflow.launch.builders.ranks import RankLayout
from dataflow.launch.config import LaunchConfig
from dataflow.launch.run_dir import RunDir, write_json_atomic
from dataflow.launch.trained_log import TrainedLog, rewind_jsonl
from dataflow.train.checkpoint import (
    CheckpointInfo,
    CheckpointManager,
    RefusedCheckpoint,
    report_refused,
)
from dataflow.train.config import TrainerConfig
from dataflow.train.eagle3 import Eagle3Objective
from dataflow.train.hooks import AckFn, AckHook, StepEvent, TrainerHook
from dataflow.train.loader import FeatureDataLoader
from dataflow.train.metrics import default_metrics, read_jsonl
from dataflow.train.optim import OptimConfig
from dataflow.train.parallel.sequence import SequenceParallelObjective
from dataflow.train.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefSource:
    """Where the loader's refs come from: exactly one of a fixed ``refs`` list (offline;
    ``num_epochs`` passes, reshuffled per epoch) or a consume-once ``queue`` (online).
    """

    refs: Sequence[SampleRef] | None = None
    queue: RefQueue | None = None
    num_epochs: int = 1

    def __post_init__(self) -> None:
        if (self.refs is None) == (self.queue is None):
            raise InvalidInputError("a ref source needs exactly one of refs= or queue=")


@dataclass
class TrainOutcome:
    """What this trainer process did (tallies of this process's run; steps are global)."""

    steps: int
    samples: int
    tokens: int
    seconds: float
    first_metrics: dict[str, Any] = field(default_factory=dict)
    final_metrics: dict[str, Any] = field(default_factory=dict)
    resumed_from_step: int | None = None
    refused_checkpoints: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class _CountingQueue:
    """A ``RefQueue`` that remembers each handed-out ref's token count."""

    def __init__(self, queue: RefQueue, tokens: dict[str, int]) -> None:
        self._queue = queue
        self._tokens = tokens

    def get(self, timeout: float | None = None) -> SampleRef | None:
        ref = self._queue.get(timeout=timeout)
        if ref is not None:
            self._tokens[ref.sample_id] = ref.num_tokens
        return ref

    def close(self) -> None:
        self._queue.close()


class _TokenHook(TrainerHook):
    """Counts the tokens and samples this rank trained in this process."""

    def __init__(self, tokens: dict[str, int]) -> None:
        self._tokens = tokens
        self.count = 0
        self.samples = 0

    def on_optimizer_step(self, event: StepEvent) -> None:
        self.samples += len(event.sample_ids)
        self.count += sum(self._tokens.get(sid, 0) for sid in event.sample_ids)


class _ExtraMetrics:
    """A metrics sink adding ``extra()``'s figures to every row it passes on."""

    def __init__(self, inner: Any, extra: Callable[[], Mapping[str, float]]) -> None:
        self._inner = inner
        self._extra = extra

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        self._inner.write(step, {**metrics, **self._extra()})

    def close(self) -> None:
        self._inner.close()


def resume_checkpoint(
    run_dir: RunDir, layout: RankLayout, run_id: str, *, announce: bool = True
) -> tuple[CheckpointInfo | None, list[RefusedCheckpoint]]:
    """The newest checkpoint of ``run_dir`` that verifies against its signed manifest, and the
    newer ones refused (every rank calls this together; nothing is unpickled to decide).

    Raises ``CheckpointRefusedError`` naming the files when checkpoints exist but none
    verifies. With ``announce``, rank 0 logs each refusal and the fallback (a warning on
    ``dataflow.launch.builders.trainer_path``: stderr by default).
    """
    manager = CheckpointManager(run_dir.checkpoints, layout.collective, run_id=run_id)
    info, refused = manager.newest_verified()
    lines = report_refused(refused, info)
    if announce and layout.rank == 0:
        for line in lines:
            log.warning("%s", line)
    return info, refused


def latest_checkpoint_step(run_dir: RunDir, layout: RankLayout, run_id: str) -> int:
    """The step of the newest verified checkpoint in ``run_dir``; -1 when there is none.

    -1 is the ledger's "nothing trained yet" step, so a consumer killed before its first
    checkpoint reconciles everything back to COMMITTED instead of being refused. A refused newer
    checkpoint is skipped here and announced by the trainer path (:func:`resume_checkpoint`).
    """
    info, _ = resume_checkpoint(run_dir, layout, run_id, announce=False)
    return info.step if info is not None else -1


def rewind_records(run_dir: RunDir, step: int) -> None:
    """Before a resume from ``step``: drop audit and metric lines of steps after it (they are
    trained again), so each sample stays listed once.
    """
    TrainedLog(run_dir.trained).rewind(step)
    rewind_jsonl(run_dir.metrics, step)


def trainer_config(config: LaunchConfig, *, progress: bool) -> TrainerConfig:
    """The trainer package's config from the launch config's ``trainer`` section."""
    t = config.trainer
    return TrainerConfig(
        run_id=config.run.id,
        accumulation_steps=t.accumulation_steps,
        max_steps=t.max_steps,
        total_steps=t.total_steps,
        optim=OptimConfig(
            lr=t.lr,
            weight_decay=t.weight_decay,
            warmup_steps=t.warmup_steps,
            min_lr_ratio=t.min_lr_ratio,
            max_grad_norm=t.max_grad_norm,
        ),
        seed=config.run.seed,
        log_interval=t.log_every,
        checkpoint_interval=t.checkpoint_every,
        keep_last=t.keep_last,
        progress=progress,
        on_nonfinite=t.on_nonfinite,
    )


def longest_sample(config: LaunchConfig) -> int:
    """The longest sample the run can produce (prompt, plus the response when regenerating):
    the loader drops anything longer as a bad sample.
    """
    longest = config.data.max_length
    if config.producer.regenerate:
        longest += config.producer.max_new_tokens
    return longest


def train_draft(
    config: LaunchConfig,
    run_dir: RunDir,
    objective: Eagle3Objective,
    store: FeatureStore,
    source: RefSource,
    ack: AckFn,
    layout: RankLayout,
    *,
    durable: Callable[[int], object] | None = None,
    resume: bool,
    progress: bool = True,
    extra_hooks: Sequence[TrainerHook] = (),
    extra_metrics: Callable[[], Mapping[str, float]] | None = None,
) -> TrainOutcome:
    """Train ``objective`` on ``source`` until the data ends or ``trainer.max_steps``.

    Guarantees: one ``ack(step, ids)`` per optimizer window (then its ``trained.jsonl`` line,
    rank 0), ``durable(step)`` after each checkpoint when given; a
    checkpoint every ``trainer.checkpoint_every`` steps and at the end; ``resume`` continues from
    the newest checkpoint after rewinding the records past it; ``extra_hooks`` run after the
    ack, ``extra_metrics`` figures join each ``metrics.jsonl`` row. Returns this process's
    tallies.
    """
    rank0 = layout.rank == 0
    if rank0:
        log.info(
            "training run %s: %s, store %s, %d rank(s), resume=%s",
            config.run.id,
            config.run.topology,
            store.uri,
            layout.collective.world_size,
            resume,
        )
    resumed_at: int | None = None
    chosen: CheckpointInfo | None = None
    refused: list[RefusedCheckpoint] = []
    if resume:
        chosen, refused = resume_checkpoint(run_dir, layout, config.run.id)
        step = chosen.step if chosen is not None else -1
        run_on_rank0(
            layout.collective,
            f"rewinding the run records to step {step}",
            lambda: rewind_records(run_dir, step),
        )
        resumed_at = step
    tokens: dict[str, int] = {}
    if source.refs is not None:
        tokens.update({ref.sample_id: ref.num_tokens for ref in source.refs})
        loader = FeatureDataLoader(
            store,
            refs=source.refs,
            batch_size=config.trainer.batch_size,
            seed=config.run.seed,
            num_epochs=source.num_epochs,
            rank=layout.data_rank,
            world_size=layout.data_world,
            pad_multiple=layout.sp_size,
            prefetch=1,
            max_length=longest_sample(config),
            max_bad_samples=config.trainer.max_bad_samples,
        )
    else:
        assert source.queue is not None
        loader = FeatureDataLoader(
            store,
            queue=_CountingQueue(source.queue, tokens),
            batch_size=config.trainer.batch_size,
            pad_multiple=layout.sp_size,
            prefetch=1,
            max_length=longest_sample(config),
            max_bad_samples=config.trainer.max_bad_samples,
        )
    ack_hook = AckHook(
        ack, durable=durable, on_acked=TrainedLog(run_dir.trained).append if rank0 else None
    )
    token_hook = _TokenHook(tokens)
    model = (
        objective
        if layout.exchange is None
        else SequenceParallelObjective(objective, layout.exchange)
    )
    trainer = Trainer(
        model,
        loader,
        trainer_config(config, progress=progress and rank0),
        backend=layout.backend,
        hooks=[ack_hook, token_hook, *extra_hooks],
        metrics=_metrics_sink(run_dir, resumed_at, extra_metrics) if rank0 else None,
        checkpoint_dir=run_dir.checkpoints,
        contract_extra={"draft_vocab_size": config.trainer.draft_vocab_size},
    )
    started = time.perf_counter()
    # Resume from exactly the checkpoint verified above (the one the ledger was settled to).
    result = trainer.fit(resume=chosen.path if chosen is not None else False)
    seconds = time.perf_counter() - started
    counts = layout.collective.all_gather_object((token_hook.samples, token_hook.count))
    rows = read_jsonl(run_dir.metrics) if rank0 and run_dir.metrics.is_file() else []
    return TrainOutcome(
        steps=result.step,
        samples=sum(c[0] for c in counts),
        tokens=sum(c[1] for c in counts),
        seconds=seconds,
        first_metrics=rows[0] if rows else {},
        final_metrics=rows[-1] if rows else {},
        resumed_from_step=chosen.step if chosen is not None else None,
        refused_checkpoints=[r.reason for r in refused],
    )


def _metrics_sink(
    run_dir: RunDir, resumed_at: int | None, extra: Callable[[], Mapping[str, float]] | None
) -> Any:
    sink = default_metrics(run_dir.root, resumed_from=resumed_at)
    return sink if extra is None else _ExtraMetrics(sink, extra)


def write_trainer_report(run_dir: RunDir, outcome: TrainOutcome) -> None:
    """``trainer.json``: the outcome's tallies and rate (rank 0)."""
    write_json_atomic(
        run_dir.trainer_report,
        {
            "steps": outcome.steps,
            "samples": outcome.samples,
            "tokens": outcome.tokens,
            "seconds": round(outcome.seconds, 3),
            "tokens_per_s": round(outcome.tokens_per_s, 1),
            "final_metrics": outcome.final_metrics,
            "first_metrics": outcome.first_metrics,
            "resumed_from_step": outcome.resumed_from_step,
            "refused_checkpoints": outcome.refused_checkpoints,
        },
    )
