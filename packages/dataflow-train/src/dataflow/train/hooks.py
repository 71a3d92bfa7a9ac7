"""Trainer hooks: what happens at each optimizer boundary besides the update itself.

Hooks run on every rank, in order, after the optimizer step and before logging and
checkpointing. A hook that uses collectives must issue the same collectives on every rank
whatever happens locally (the distributed ack does); the trainer then agrees across ranks on
whether any hook failed, so all ranks fail together.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dataflow.contracts import Collective, InvalidInputError, Ledger, WeightVersion
from dataflow.contracts.checks import is_int
from dataflow.contracts.ids import validate_id
from dataflow.control.dist_ack import DistAckResult, distributed_ack
from dataflow.train.parallel.backend import TrainBackend


@dataclass(frozen=True)
class StepEvent:
    """One finished optimizer step as a hook sees it.

    ``sample_ids`` are the ids THIS rank trained in the step's window, in the order trained
    (empty on a rank whose backend does not report samples: a sequence-parallel peer of the
    rank that does). ``loss`` and ``metrics`` are already averaged over micro-steps and ranks.
    """

    step: int
    sample_ids: tuple[str, ...]
    loss: float
    lr: float
    grad_norm: float
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class HookContext:
    """What a hook may use: the prepared (possibly sharded) model and the rank's backend."""

    model: nn.Module
    backend: TrainBackend
    run_id: str


class TrainerHook:
    """Base class: every callback is a no-op until overridden.

    ``state_dict``/``load_state_dict`` (JSON-compatible) are saved in and restored from every
    checkpoint, so a hook's progress resumes with the run.
    """

    def on_fit_start(self, context: HookContext) -> None:
        return None

    def on_optimizer_step(self, event: StepEvent) -> None:
        return None

    def on_checkpoint(self, step: int, path: str) -> None:
        return None

    def on_fit_end(self, ok: bool) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


AckFn = Callable[[int, Sequence[str]], object]
"""``ack(step, sample_ids)``: settles one optimizer window (a ``DistAckResult`` when distributed)."""

AckedFn = Callable[[int, tuple[str, ...]], object]
"""``on_acked(step, all_ids)``: told once an ack returned, with every rank's ids of the step."""


class AckHook(TrainerHook):
    """The one place that decides when a trained window is acknowledged (docs/architecture.md §7).

    At every optimizer boundary, on every rank in lockstep, after the optimizer step and before
    metrics and checkpoint: ``ack(step, sample_ids)``; then ``on_acked(step, all_ids)`` (the
    audit trail) with every rank's ids when ``ack`` returned a ``DistAckResult``, else this
    rank's. After each checkpoint, ``durable(step)`` (if given) declares the step durable, which
    frees features under the ``on_checkpoint`` release policy.

    The ack functions: :class:`LedgerAck` (distributed ack writing a ledger),
    :class:`RetainedAck` (ranks agree; nothing written or freed) or a control-plane consumer
    side's ``ack`` (:class:`ControlPlaneHook`). ``acked_step`` (saved in checkpoints as the
    ledger step) is the last step whose ack returned; ``samples`` counts the acked samples of
    every rank.
    """

    def __init__(
        self,
        ack: AckFn,
        *,
        durable: Callable[[int], object] | None = None,
        on_acked: AckedFn | None = None,
    ) -> None:
        self._ack = ack
        self._durable = durable
        self._on_acked = on_acked
        self.acked_step = 0
        self.durable_step = 0
        self.samples = 0

    def on_optimizer_step(self, event: StepEvent) -> None:
        result = self._ack(event.step, event.sample_ids)
        self.acked_step = event.step
        ids = result.all_ids if isinstance(result, DistAckResult) else tuple(event.sample_ids)
        self.samples += len(ids)
        if self._on_acked is not None:
            self._on_acked(event.step, ids)

    def on_checkpoint(self, step: int, path: str) -> None:
        if self._durable is not None:
            self._durable(step)
            self.durable_step = step

    def state_dict(self) -> dict[str, Any]:
        return {"acked_step": self.acked_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.acked_step = int(state.get("acked_step", 0))


class ConsumerControl(Protocol):
    """The control plane's per-rank consumer side (``dataflow.control.ConsumerSide``)."""

    def ack(self, step: int, sample_ids: Sequence[str]) -> object: ...

    def checkpoint_durable(self, step: int) -> object: ...


class ControlPlaneHook(AckHook):
    """:class:`AckHook` over the control plane's consumer side.

    At each optimizer boundary it acks the window (``consumer.ack``: the distributed ack);
    with ``release_on_checkpoint`` (default), after each checkpoint it declares the step durable
    (``consumer.checkpoint_durable``), which frees the features trained at or before it. Every
    rank calls both in lockstep, as the consumer side requires.
    """

    def __init__(
        self,
        consumer: ConsumerControl,
        *,
        release_on_checkpoint: bool = True,
        on_acked: AckedFn | None = None,
    ) -> None:
        super().__init__(
            consumer.ack,
            durable=consumer.checkpoint_durable if release_on_checkpoint else None,
            on_acked=on_acked,
        )


class LedgerAck:
    """The ack a multi-rank (or single-rank) trainer plugs into :class:`AckHook`.

    Runs the control plane's distributed ack over ``collective``: every rank's window ids are
    gathered, rank 0 writes them to ``ledger`` in one ``ack(step, ids)`` transaction, the outcome
    is broadcast, then each rank frees its own samples with ``free_local`` (if given). Every rank
    raises alike when the write or any rank's free failed.
    """

    def __init__(
        self,
        collective: Collective,
        ledger: Ledger | None,
        free_local: Callable[[int, list[str]], None] | None = None,
    ) -> None:
        if collective.rank == 0 and ledger is None:
            raise InvalidInputError("rank 0 writes the acks: it needs the ledger")
        self._collective = collective
        self._ledger = ledger
        self._free_local = free_local

    def _write(self, step: int, ids: list[str]) -> None:
        assert self._ledger is not None
        self._ledger.ack(step, ids)

    def __call__(self, step: int, sample_ids: Sequence[str]) -> DistAckResult:
        return distributed_ack(
            self._collective, step, sample_ids, write=self._write, free_local=self._free_local
        )


class RetainedAck:
    """The offline ack for :class:`AckHook`: every rank's window ids are gathered over
    ``collective`` so all ranks agree on the step; nothing is written and nothing freed (the
    dataset is retained for the next epoch).
    """

    def __init__(self, collective: Collective) -> None:
        self._collective = collective

    def __call__(self, step: int, sample_ids: Sequence[str]) -> DistAckResult:
        return distributed_ack(self._collective, step, sample_ids, write=lambda _s, _ids: None)


class WeightRegistry(Protocol):
    """Where published draft versions are registered (the ledger's weight registry)."""

    def publish_weight(self, version: WeightVersion) -> WeightVersion: ...

    def weight_versions(self) -> list[WeightVersion]: ...


class WeightPublishHook(TrainerHook):
    """Publishes draft-weight versions in the registry: the staleness axis of the run.

    Rank 0 publishes; every rank takes part in gathering weights. Version ids are
    ``<run_id>-step<N>``; each step is published at most once.

    - ``interval`` N > 0: every N optimizer steps, save the trainable weights to
      ``<directory>/<run_id>-step<N>/model.safetensors`` atomically (temporary file, then
      rename) and publish a version located there (frozen target parameters left out);
    - ``at_checkpoints``: after each durable checkpoint, publish a version located at the
      checkpoint (no extra I/O; a step already published by ``interval`` is not published again);
    - ``initial``: at fit start, when the registry holds no version yet, publish ``step0`` (the
      initial weights, located nowhere), so samples made before the first checkpoint carry a
      known version instead of none.

    ``target_version`` (called at each publish) names the target the weights were trained
    against; it defaults to ``"unknown"``.
    """

    def __init__(
        self,
        registry: WeightRegistry,
        directory: str | Path,
        interval: int = 1,
        *,
        at_checkpoints: bool = False,
        initial: bool = False,
        target_version: Callable[[], str] | None = None,
    ) -> None:
        if not is_int(interval) or interval < 0:
            raise InvalidInputError(f"publish interval must be an int >= 0, got {interval!r}")
        if interval == 0 and not (at_checkpoints or initial):
            raise InvalidInputError(
                "WeightPublishHook publishes nothing: set interval >= 1, at_checkpoints or initial"
            )
        self._registry = registry
        self._dir = Path(directory)
        self._interval = interval
        self._at_checkpoints = at_checkpoints
        self._initial = initial
        self._target = target_version
        self._context: HookContext | None = None
        self.published: list[WeightVersion] = []

    def on_fit_start(self, context: HookContext) -> None:
        validate_id(context.run_id, "run id")
        self._context = context
        if self._initial and context.backend.rank == 0 and not self._registry.weight_versions():
            self._publish(0, None)

    def _publish(self, step: int, location: str | None) -> None:
        ctx = self._context
        if ctx is None:
            raise InvalidInputError("WeightPublishHook used before on_fit_start")
        target = self._target() if self._target is not None else "unknown"
        version = self._registry.publish_weight(
            WeightVersion(
                version_id=f"{ctx.run_id}-step{step}",
                step=step,
                location=location,
                target_version=target or "unknown",
            )
        )
        self.published.append(version)

    def on_optimizer_step(self, event: StepEvent) -> None:
        if not self._interval or event.step % self._interval:
            return
        ctx = self._context
        if ctx is None:
            raise InvalidInputError("WeightPublishHook used before on_fit_start")
        trainable = {name for name, p in ctx.model.named_parameters() if p.requires_grad}
        full = get_model_state_dict(
            ctx.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if ctx.backend.rank != 0:
            return
        from safetensors.torch import save_file

        target = self._dir / f"{ctx.run_id}-step{event.step}"
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / "model.safetensors.tmp"
        weights = {
            k: v.contiguous()
            for k, v in full.items()
            if k in trainable and isinstance(v, torch.Tensor)
        }
        save_file(weights, str(tmp), metadata={"step": str(event.step)})
        os.replace(tmp, target / "model.safetensors")
        self._publish(event.step, str(target))

    def on_checkpoint(self, step: int, path: str) -> None:
        ctx = self._context
        if not self._at_checkpoints or ctx is None or ctx.backend.rank != 0:
            return
        if self._interval and step % self._interval == 0:
            return  # published with its saved weights at the optimizer step
        self._publish(step, path)
