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

from dataflow.contracts import Collective, InvalidInputError, Ledger, WeightVersion, validate_id
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


class AckHook(TrainerHook):
    """Acknowledges each optimizer window: ``ack(step, sample_ids)`` at every boundary.

    With several ranks, ``ack`` is the control plane's distributed ack (gather → rank 0 writes
    → broadcast → local free), called on every rank in lockstep. ``acked_step`` (saved in
    checkpoints as the ledger step) is the last step whose ack returned.
    """

    def __init__(self, ack: AckFn) -> None:
        self._ack = ack
        self.acked_step = 0

    def on_optimizer_step(self, event: StepEvent) -> None:
        self._ack(event.step, event.sample_ids)
        self.acked_step = event.step

    def state_dict(self) -> dict[str, Any]:
        return {"acked_step": self.acked_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.acked_step = int(state.get("acked_step", 0))


class ConsumerControl(Protocol):
    """The control plane's per-rank consumer side (``dataflow.control.ConsumerSide``)."""

    def ack(self, step: int, sample_ids: Sequence[str]) -> object: ...

    def checkpoint_durable(self, step: int) -> object: ...


class ControlPlaneHook(AckHook):
    """Wires the trainer to the control plane's consumer side.

    At each optimizer boundary it acks the window (``consumer.ack``: the distributed ack);
    after each checkpoint it declares the step durable (``consumer.checkpoint_durable``), which
    frees the features trained at or before it under the default release policy. Every rank
    calls both in lockstep, as the consumer side requires.
    """

    def __init__(self, consumer: ConsumerControl) -> None:
        super().__init__(consumer.ack)
        self._consumer = consumer
        self.durable_step = 0

    def on_checkpoint(self, step: int, path: str) -> None:
        self._consumer.checkpoint_durable(step)
        self.durable_step = step


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


class WeightRegistry(Protocol):
    """Where published draft versions are registered (the ledger's weight registry)."""

    def publish_weight(self, version: WeightVersion) -> WeightVersion: ...


class WeightPublishHook(TrainerHook):
    """Every ``interval`` steps: save the trainable weights, then register a :class:`WeightVersion`.

    All ranks take part in gathering the full (unsharded) weights; rank 0 writes
    ``<directory>/<run_id>-step<N>/model.safetensors`` atomically (temporary file, then rename)
    and publishes ``WeightVersion(version_id="<run_id>-step<N>", step=N, location=<that dir>)``.
    Frozen parameters (the target's embedding and head) are not part of a version.
    """

    def __init__(self, registry: WeightRegistry, directory: str | Path, interval: int = 1) -> None:
        if interval < 1:
            raise InvalidInputError(f"publish interval must be >= 1, got {interval}")
        self._registry = registry
        self._dir = Path(directory)
        self._interval = interval
        self._context: HookContext | None = None
        self.published: list[WeightVersion] = []

    def on_fit_start(self, context: HookContext) -> None:
        validate_id(context.run_id, "run id")
        self._context = context

    def on_optimizer_step(self, event: StepEvent) -> None:
        if event.step % self._interval:
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

        version_id = f"{ctx.run_id}-step{event.step}"
        target = self._dir / version_id
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / "model.safetensors.tmp"
        weights = {
            k: v.contiguous()
            for k, v in full.items()
            if k in trainable and isinstance(v, torch.Tensor)
        }
        save_file(weights, str(tmp), metadata={"step": str(event.step)})
        os.replace(tmp, target / "model.safetensors")
        version = self._registry.publish_weight(
            WeightVersion(version_id=version_id, step=event.step, location=str(target))
        )
        self.published.append(version)
