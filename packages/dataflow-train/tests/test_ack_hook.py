"""The one ack seam: ``AckHook`` acks every window, tells ``on_acked`` every rank's ids once the
ack returned, declares checkpoints durable only when asked; ``RetainedAck`` writes nothing.
"""

from __future__ import annotations

import pytest

from dataflow.control import DistAckResult
from dataflow.train.distributed import LocalCollective
from dataflow.train.hooks import AckHook, ControlPlaneHook, RetainedAck, StepEvent


def _event(step: int, *ids: str) -> StepEvent:
    return StepEvent(step=step, sample_ids=ids, loss=1.0, lr=0.1, grad_norm=0.0)


class RecordingConsumer:
    """A consumer side that records what the hook asked of it (the ConsumerControl protocol)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def ack(self, step, sample_ids):
        self.calls.append(("ack", step))
        return DistAckResult(step=step, all_ids=(*sample_ids, "peer"), local_ids=tuple(sample_ids))

    def checkpoint_durable(self, step):
        self.calls.append(("durable", step))


def test_on_acked_gets_every_ranks_ids_after_the_ack_returned():
    consumer, seen = RecordingConsumer(), []
    hook = ControlPlaneHook(consumer, on_acked=lambda step, ids: seen.append((step, ids)))
    hook.on_optimizer_step(_event(1, "a", "b"))
    hook.on_checkpoint(1, "/ckpt")
    assert consumer.calls == [("ack", 1), ("durable", 1)]
    assert seen == [(1, ("a", "b", "peer"))]
    assert (hook.acked_step, hook.durable_step, hook.samples) == (1, 1, 3)
    assert hook.state_dict() == {"acked_step": 1}


def test_without_release_on_checkpoint_a_checkpoint_frees_nothing():
    consumer = RecordingConsumer()
    hook = ControlPlaneHook(consumer, release_on_checkpoint=False)
    hook.on_optimizer_step(_event(1, "a"))
    hook.on_checkpoint(1, "/ckpt")
    assert consumer.calls == [("ack", 1)]
    assert hook.durable_step == 0


def test_retained_ack_agrees_on_the_window_and_a_plain_ack_reports_this_ranks_ids():
    seen: list[tuple[int, tuple[str, ...]]] = []
    retained = AckHook(
        RetainedAck(LocalCollective()), on_acked=lambda s, ids: seen.append((s, ids))
    )
    retained.on_optimizer_step(_event(2, "x", "y"))
    plain = AckHook(lambda step, ids: None, on_acked=lambda s, ids: seen.append((s, ids)))
    plain.on_optimizer_step(_event(3, "z"))
    assert seen == [(2, ("x", "y")), (3, ("z",))]


def test_a_failing_ack_is_not_recorded():
    def refuse(step, ids):
        raise RuntimeError("ledger down")

    seen: list[object] = []
    hook = AckHook(refuse, on_acked=lambda s, ids: seen.append(s))
    with pytest.raises(RuntimeError, match="ledger down"):
        hook.on_optimizer_step(_event(1, "a"))
    assert (seen, hook.acked_step, hook.samples) == ([], 0, 0)
