"""How an optimizer window is acknowledged, and the hook that writes the audit trail.

Two acks, one hook: online runs ack through the ledger's consumer side (the window becomes
TRAINED; features freed per the release policy), offline runs train a retained dataset epoch
after epoch and only agree on the window across ranks. Either way ``trained.jsonl`` gets its
line only after the ack returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from dataflow.contracts import Collective
from dataflow.control import ConsumerSide, DistAckResult, distributed_ack
from dataflow.launch.trained_log import TrainedLog
from dataflow.train.hooks import AckHook, StepEvent


class WindowAck(Protocol):
    """Acknowledges one optimizer window on every rank in lockstep."""

    def ack(self, step: int, sample_ids: Sequence[str]) -> DistAckResult: ...

    def checkpoint_durable(self, step: int) -> None: ...


class LedgerWindowAck:
    """Acks through the ledger (one transaction per step); a durable checkpoint frees features
    when the release policy is ``on_checkpoint``.
    """

    def __init__(self, consumer: ConsumerSide, *, tracks_checkpoints: bool) -> None:
        self._consumer = consumer
        self._tracks = tracks_checkpoints

    def ack(self, step: int, sample_ids: Sequence[str]) -> DistAckResult:
        return self._consumer.ack(step, sample_ids)

    def checkpoint_durable(self, step: int) -> None:
        if self._tracks:
            self._consumer.checkpoint_durable(step)


class RetainedWindowAck:
    """Offline ack: every rank's window ids are gathered (no ledger write, nothing freed — the
    dataset is retained for the next epoch).
    """

    def __init__(self, collective: Collective) -> None:
        self._collective = collective

    def ack(self, step: int, sample_ids: Sequence[str]) -> DistAckResult:
        return distributed_ack(self._collective, step, sample_ids, write=lambda _s, _ids: None)

    def checkpoint_durable(self, step: int) -> None:
        return None


class AuditedAckHook(AckHook):
    """Acks each window, then (rank 0) appends the step's ids from every rank to
    ``trained.jsonl``; a durable checkpoint is passed on to the ack.
    """

    def __init__(self, window_ack: WindowAck, log: TrainedLog | None) -> None:
        super().__init__(window_ack.ack)
        self._window_ack = window_ack
        self._log = log
        self.samples = 0

    def on_optimizer_step(self, event: StepEvent) -> None:
        result = self._window_ack.ack(event.step, event.sample_ids)
        self.acked_step = event.step
        self.samples += len(result.all_ids)
        if self._log is not None:
            self._log.append(event.step, result.all_ids)

    def on_checkpoint(self, step: int, path: str) -> None:
        self._window_ack.checkpoint_durable(step)
