"""Trainer: batches in, optimizer steps out, every boundary acknowledged, resumable at any step.

The loop is the same for every topology: colocated or disaggregated, offline or online, one
rank or many differ only in the loader's ref source, the store behind it and the backend.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from dataflow.contracts import InvalidInputError, RunFailedError, SampleRef, TrainBatch
from dataflow.train.checkpoint import (
    CheckpointInfo,
    CheckpointManager,
    RefusedCheckpoint,
    fingerprint,
    report_refused,
)
from dataflow.train.checkpoint_state import (
    HookStates,
    ModelState,
    OptimizerState,
    PerRank,
    RNGState,
)
from dataflow.train.config import TrainerConfig
from dataflow.train.elastic import Resharding, resume_plan
from dataflow.train.hooks import AckHook, HookContext, StepEvent, TrainerHook
from dataflow.train.host_memory import retain_freed_host_memory
from dataflow.train.loader import FeatureDataLoader
from dataflow.train.metrics import MetricsProgress, MetricsSink
from dataflow.train.nonfinite import guard_step
from dataflow.train.optim import WarmupCosineSchedule, build_adamw
from dataflow.train.parallel.backend import LocalBackend, TrainBackend
from dataflow.train.rng import seed_rng

_log = logging.getLogger(__name__)


class ObjectiveOutput(Protocol):
    """What an objective's ``forward`` returns: a scalar loss and detached scalar metrics."""

    @property
    def loss(self) -> torch.Tensor: ...

    @property
    def metrics(self) -> Mapping[str, torch.Tensor]: ...


CountsToMetrics = Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]
"""Forms ratio metrics from additive counts summed over a window's micro-steps and all ranks
(EAGLE3: ``lambda c: metrics_from_counts(c, config.step_weights)``)."""


@dataclass
class FitResult:
    """What ``fit`` did: the optimizer steps reached and the loss of each step it ran."""

    step: int
    losses: dict[int, float] = field(default_factory=dict)
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    resumed_from: CheckpointInfo | None = None
    refused_checkpoints: list[RefusedCheckpoint] = field(default_factory=list)


@dataclass
class _Window:
    """One optimizer window in progress on this rank."""

    micro: int = 0
    sample_ids: list[str] = field(default_factory=list)
    loss: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    data_wait_s: float = 0.0


class Trainer:
    """Trains ``objective`` on ``loader``'s batches (see the module docstring).

    Guarantees:
    - one optimizer step per ``accumulation_steps`` batches (the window); LR warmup + cosine,
      global-norm clipping, AdamW over fp32 parameters whatever the compute precision;
    - at each boundary, in order: clip, step, hooks (e.g. the ack with this rank's window ids),
      metrics (rank 0), checkpoint when due;
    - metrics are the objective's, averaged over the window and the ranks; with
      ``metrics_from_counts`` the ratio metrics are instead formed once from the output's
      additive ``counts`` summed over the window and every rank (exact global ratios);
    - ranks fail together: data, forward and hook failures are agreed on across ranks so every
      rank raises; any other failure tears the process groups down so peers fail at once;
    - ``fit(resume=...)`` restores model, optimizer, schedule, RNG, loader position and hook
      states, after refusing a checkpoint written under a different config;
    - when ``fit`` ends, by success or failure, the loader is closed and the refs it fetched but
      never yielded are in ``unyielded_refs`` for the caller to settle;
    - the process keeps freed host memory mapped (glibc: fixed mmap and trim thresholds, see
      :mod:`dataflow.train.host_memory`), so a step reuses the last step's activation memory
      instead of faulting it in again.
    """

    def __init__(
        self,
        objective: nn.Module,
        loader: FeatureDataLoader,
        config: TrainerConfig,
        *,
        backend: TrainBackend | None = None,
        hooks: Sequence[TrainerHook] = (),
        metrics: MetricsSink | None = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_fault_hook: Any = None,
        contract_extra: Mapping[str, Any] | None = None,
        metrics_from_counts: CountsToMetrics | None = None,
    ) -> None:
        # Process-wide and once: set before the model and its first step allocate anything.
        self.host_memory_retained = retain_freed_host_memory()
        self.config = config
        self.loader = loader
        self.backend: TrainBackend = backend or LocalBackend()
        self.hooks = list(hooks)
        self._metrics_from_counts = metrics_from_counts
        self._metrics = metrics if self.backend.rank == 0 else None
        self.total_steps = self._horizon()
        torch.manual_seed(config.seed)
        self.model = self.backend.prepare(objective)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_adamw(self._params, config.optim)
        self.schedule = WarmupCosineSchedule(self.optimizer, config.optim, self.total_steps)
        self.checkpoints = (
            CheckpointManager(
                checkpoint_dir,
                self.backend.collective,
                keep_last=config.keep_last,
                fault_hook=checkpoint_fault_hook,
                run_id=config.run_id,
            )
            if checkpoint_dir is not None
            else None
        )
        self.contract = {
            "trainer": {**config.resume_contract(), "total_steps": self.total_steps},
            "global_batch": self.global_batch,
            "loader": loader.contract(),
            "extra": dict(contract_extra or {}),
        }
        self.metrics_progress = MetricsProgress()
        self.step = 0
        self._saved_step = -1
        # Refs the loader fetched but never yielded, set when fit ends (either way); the caller
        # settles them (online: still ASSIGNED in the ledger, so reconcile re-delivers them).
        self.unyielded_refs: list[SampleRef] = []

    def _horizon(self) -> int:
        cfg, planned = self.config, self.loader.planned_batches
        if planned is not None:
            runs_to_end = cfg.max_steps is None or cfg.max_steps * cfg.accumulation_steps > planned
            if runs_to_end and planned % cfg.accumulation_steps:
                raise InvalidInputError(
                    f"the loader plans {planned} batches per rank, not a multiple of "
                    f"accumulation_steps={cfg.accumulation_steps}: the last optimizer window "
                    "could not be completed (set max_steps or change the batch plan)"
                )
        horizon = cfg.total_steps or cfg.max_steps
        if horizon is None and planned is not None:
            horizon = planned // cfg.accumulation_steps
        if not horizon:
            raise InvalidInputError(
                "the LR schedule needs a horizon: set total_steps or max_steps (a streamed "
                "source has no planned length), and give the loader at least one window"
            )
        return horizon

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks: data-parallel ranks x batch size x
        accumulation steps (the run's quantum; fixed for a run, whatever its number of ranks).
        """
        return (
            self.backend.data_parallel_size
            * self.loader.batch_size
            * self.config.accumulation_steps
        )

    def _ranks(self) -> dict[str, int]:
        return {
            "world_size": self.backend.world_size,
            "data_parallel_size": self.backend.data_parallel_size,
        }

    # ------------------------------------------------------------------- resume
    def state(self, *, per_rank: bool = True) -> dict[str, Any]:
        """The checkpoint: every resumable piece by name, as handed to DCP.

        ``model``, ``optim`` (resharded by DCP when the number of ranks changes), ``schedule``,
        ``hooks``, ``metrics`` (the same on every rank) and, with ``per_rank``, this rank's
        ``loader`` position and ``rng`` (filed under ``rank-<r>``).
        """
        pieces: dict[str, Any] = {
            "model": ModelState(self.model),
            "optim": OptimizerState(self.model, self.optimizer),
            "schedule": self.schedule,
            "hooks": HookStates(self._keyed_hooks()),
            "metrics": self.metrics_progress,
        }
        if per_rank:
            rank = self.backend.rank
            pieces["loader"] = PerRank(self.loader, rank)
            pieces["rng"] = PerRank(RNGState(), rank)
        return pieces

    def restore(self, checkpoint: CheckpointInfo) -> None:
        """Load ``checkpoint`` into this trainer; refuse it if its config differs.

        The same number of ranks restores every piece as saved. Another number of
        data-parallel ranks (elastic resume) needs the same global batch
        (:func:`dataflow.train.elastic.resume_plan`): DCP reshards the model and optimizer,
        and each rank's loader position and RNG are derived from the step (the ledger's
        resume point) instead of loaded. Raises :class:`InvalidInputError` naming every
        differing field and changes nothing then.
        """
        if self.checkpoints is None:
            raise InvalidInputError("restore needs a trainer built with checkpoint_dir")
        shared = self.checkpoints.read_shared(checkpoint)
        plan = resume_plan(
            checkpoint.path,
            shared,
            self.contract,
            self._ranks(),
            batch_size=self.loader.batch_size,
        )
        step = int(shared["step"])
        self.checkpoints.load(checkpoint, self.state(per_rank=plan is None))
        if plan is not None:
            self._reshard_positions(step, plan)
        self.step = self._saved_step = step
        _log.info("resumed from checkpoint %s (step %d)", checkpoint.path, self.step)

    def _reshard_positions(self, step: int, plan: Resharding) -> None:
        """Each rank's position in the data and its RNG after an elastic resume at ``step``."""
        self.loader.seek(step * self.config.accumulation_steps)
        seed_rng(self.config.seed, step, self.backend.rank)
        _log.info("%s", plan.describe(step))

    def _keyed_hooks(self) -> dict[str, TrainerHook]:
        keyed: dict[str, TrainerHook] = {}
        for hook in self.hooks:
            name = type(hook).__name__
            key, n = name, 1
            while key in keyed:
                n += 1
                key = f"{name}#{n}"
            keyed[key] = hook
        return keyed

    def save_checkpoint(self) -> CheckpointInfo:
        """Save the current step (every rank calls this together)."""
        if self.checkpoints is None:
            raise InvalidInputError("save_checkpoint needs a trainer built with checkpoint_dir")
        acked = [h.acked_step for h in self.hooks if isinstance(h, AckHook)]
        shared = {
            "config": self.contract,
            "fingerprint": fingerprint(self.contract),
            "ranks": self._ranks(),
            "run_id": self.config.run_id,
            "ledger_step": max(acked) if acked else None,
        }
        # This rank's receipt (JSON, for people): the loaded copy of its state is DCP's.
        receipt = {"rank": self.backend.rank, "loader": self.loader.state_dict()}
        info = self.checkpoints.save(self.step, self.state(), receipt, shared)
        self._saved_step = self.step
        _log.info("checkpoint of step %d written to %s", self.step, info.path)
        error: BaseException | None = None
        try:
            for hook in self.hooks:
                hook.on_checkpoint(self.step, str(info.path))
        except Exception as exc:  # agreed below
            error = exc
        self.backend.agree("checkpoint hooks", error)
        return info

    # --------------------------------------------------------------------- fit
    def fit(self, resume: bool | str | Path = False) -> FitResult:
        """Train until ``max_steps`` or the end of the data; see the class guarantees.

        ``resume``: ``True`` continues from the latest complete checkpoint (if any), a path
        from that checkpoint directory.
        """
        result = FitResult(step=self.step)
        context = HookContext(self.model, self.backend, self.config.run_id)
        ok = False
        try:
            if resume:
                self._resume(resume, result)
                result.step = self.step
            for hook in self.hooks:
                hook.on_fit_start(context)
            self._run(result)
            if self.checkpoints is not None and self.step > 0 and self._saved_step != self.step:
                result.checkpoints.append(self.save_checkpoint())
            ok = True
        except BaseException:
            self.backend.abort()
            raise
        finally:
            self._finish(ok)
        result.step = self.step
        return result

    def _resume(self, resume: bool | str | Path, result: FitResult) -> None:
        if self.checkpoints is None:
            raise InvalidInputError("resume needs a trainer built with checkpoint_dir")
        if resume is True:
            info, refused = self.checkpoints.newest_verified()
            result.refused_checkpoints = refused
            for line in report_refused(refused, info):
                if self.backend.rank == 0:
                    _log.warning("%s", line)
        else:
            assert not isinstance(resume, bool)
            info = self.checkpoints.resolve(Path(resume))
        if info is not None:
            self.restore(info)
            result.resumed_from = info

    def _finish(self, ok: bool) -> None:
        errors: list[BaseException] = []
        self.unyielded_refs = self.loader.close()
        for hook in self.hooks:
            try:
                hook.on_fit_end(ok)
            except Exception as exc:  # every hook gets its call; the first error is raised
                errors.append(exc)
        if self._metrics is not None:
            try:
                self._metrics.close()
            except Exception as exc:
                errors.append(exc)
        if ok and errors:
            raise errors[0]

    def _run(self, result: FitResult) -> None:
        cfg = self.config
        if cfg.max_steps is not None and self.step >= cfg.max_steps:
            return
        bar = tqdm(
            total=cfg.max_steps or self.total_steps,
            initial=self.step,
            desc="Training",
            unit="step",
            disable=None if cfg.progress and self.backend.rank == 0 else True,
        )
        batches = iter(self.loader)
        window = _Window()
        started = time.perf_counter()
        try:
            while True:
                batch = self._next_batch(batches, window)
                if batch is None:
                    break
                self._micro_step(batch, window)
                if window.micro < cfg.accumulation_steps:
                    continue
                self._boundary(window, started, result)
                bar.update(1)
                window, started = _Window(), time.perf_counter()
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    return
        finally:
            bar.close()
        if window.micro:
            raise RunFailedError(
                f"the data ended {window.micro} micro-batches into an optimizer window of "
                f"{cfg.accumulation_steps}; a partial window is never stepped"
            )

    def _next_batch(self, batches: Any, window: _Window) -> TrainBatch | None:
        began = time.perf_counter()
        batch: TrainBatch | None = None
        error: BaseException | None = None
        try:
            batch = next(batches)
        except StopIteration:
            pass
        except Exception as exc:  # agreed below so every rank raises
            error = exc
        window.data_wait_s += time.perf_counter() - began
        all_ended = self.backend.agree("data loading", error, end=batch is None)
        return None if all_ended else batch

    def _micro_step(self, batch: TrainBatch, window: _Window) -> None:
        boundary = window.micro + 1 == self.config.accumulation_steps
        self.backend.set_gradient_sync(self.model, boundary)
        output: ObjectiveOutput | None = None
        error: BaseException | None = None
        try:
            device = self.backend.device
            tensors = {name: t.to(device) for name, t in batch.tensors.items()}  # type: ignore[attr-defined]
            with self.backend.autocast():
                output = self.model(tensors)
        except Exception as exc:  # agreed below so every rank raises
            error = exc
        self.backend.agree("forward", error)
        assert output is not None
        (output.loss / self.config.accumulation_steps).backward()
        window.micro += 1
        window.sample_ids.extend(batch.sample_ids)
        window.loss += output.loss.detach().double().cpu()
        for name, value in output.metrics.items():
            window.metrics[name] = window.metrics.get(name, 0) + value.detach().double().cpu()
        if self._metrics_from_counts is not None:
            for name, value in getattr(output, "counts", {}).items():
                window.counts[name] = window.counts.get(name, 0) + value.detach().double().cpu()

    def _global_ratio_metrics(
        self, counts: dict[str, torch.Tensor], to_metrics: CountsToMetrics
    ) -> dict[str, float]:
        names = sorted(counts)
        means = self.backend.mean_over_ranks(torch.stack([counts[n] for n in names]))
        summed = dict(zip(names, means * self.backend.world_size, strict=True))
        return {name: float(value) for name, value in to_metrics(summed).items()}

    def _boundary(self, window: _Window, started: float, result: FitResult) -> None:
        cfg = self.config
        grad_norm = self.backend.clip_grad_norm(self._params, cfg.optim.max_grad_norm)
        lr = self.schedule.lr
        names = sorted(window.metrics)
        packed = torch.stack([window.loss, *(window.metrics[n] for n in names)]) / window.micro
        reduced = self.backend.mean_over_ranks(packed).tolist()
        loss, metrics = reduced[0], dict(zip(names, reduced[1:], strict=True))
        # Global loss and norm, so every rank decides the same; raises under on_nonfinite=fail.
        skipped = guard_step(self.step + 1, loss, grad_norm, window.sample_ids, cfg.on_nonfinite)
        if not skipped:
            self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if skipped:
            metrics["nonfinite_skipped"] = 1.0
        if window.counts and self._metrics_from_counts is not None:
            metrics.update(self._global_ratio_metrics(window.counts, self._metrics_from_counts))
        result.losses[self.step] = loss
        reported = tuple(window.sample_ids) if self.backend.reports_samples else ()
        event = StepEvent(self.step, reported, loss, lr, grad_norm, metrics)
        error: BaseException | None = None
        try:
            for hook in self.hooks:
                hook.on_optimizer_step(event)
        except Exception as exc:  # agreed below so every rank raises
            error = exc
        self.backend.agree("optimizer-step hooks", error)
        _log.debug(
            "step %d: loss %.6g, lr %.3g, %d sample(s) on this rank",
            self.step,
            loss,
            lr,
            len(window.sample_ids),
        )
        if self._metrics is not None and self.step % cfg.log_interval == 0:
            elapsed = time.perf_counter() - started
            row = {
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "step_time_s": elapsed,
                "data_wait_s": window.data_wait_s,
                "samples_per_s": len(window.sample_ids) * self.backend.data_parallel_size / elapsed,
                **{f"train/{k}": v for k, v in metrics.items()},
            }
            self._metrics.write(self.step, row)
        if self.step % cfg.log_interval == 0:
            self.metrics_progress.record(self.step)
        if (
            self.checkpoints is not None
            and cfg.checkpoint_interval
            and self.step % cfg.checkpoint_interval == 0
        ):
            result.checkpoints.append(self.save_checkpoint())
