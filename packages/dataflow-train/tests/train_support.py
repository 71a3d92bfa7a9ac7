"""Shared builders for the trainer-infrastructure tests: tiny EAGLE3 shapes, samples in a store."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dataflow.contracts import FeatureStore, SampleRef
from dataflow.train.eagle3 import Eagle3Config, Eagle3Objective

HIDDEN = 16
VOCAB = 64


def tiny_config(ttt_length: int = 2) -> Eagle3Config:
    return Eagle3Config(
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        vocab_size=VOCAB,
        draft_vocab_size=32,
        target_layers=(1, 2, 3),
        ttt_length=ttt_length,
    )


def tiny_objective(seed: int = 0) -> Eagle3Objective:
    return Eagle3Objective(tiny_config(), seed=seed)


def sample_tensors(seed: int, length: int, hidden: int = HIDDEN) -> dict[str, torch.Tensor]:
    """One EAGLE3 sample as the rollout side captures it: ``[1, T, ...]`` features."""
    gen = torch.Generator().manual_seed(seed)
    loss_mask = torch.ones(1, length, dtype=torch.int64)
    loss_mask[0, : length // 4] = 0
    return {
        "input_ids": torch.randint(0, VOCAB, (1, length), generator=gen),
        "loss_mask": loss_mask,
        "hidden_state": torch.randn(1, length, hidden, generator=gen),
        "aux_hidden_state": torch.randn(1, length, 3 * hidden, generator=gen),
    }


def put_samples(
    store: FeatureStore, count: int, lengths: Sequence[int] | int = 8, prefix: str = "s"
) -> list[SampleRef]:
    """Put ``count`` deterministic samples (seeded by index) and return their refs in order."""
    refs = []
    for i in range(count):
        length = lengths if isinstance(lengths, int) else lengths[i % len(lengths)]
        refs.append(store.put(f"{prefix}{i:03d}", sample_tensors(1000 + i, length)))
    return refs


class CountingStore:
    """Wraps a real store and records which samples were fetched (to prove seeks fetch nothing)."""

    def __init__(self, inner: FeatureStore) -> None:
        self.inner = inner
        self.fetched: list[str] = []

    def get(self, ref, names=None):  # type: ignore[no-untyped-def]
        self.fetched.append(ref.sample_id)
        return self.inner.get(ref, names)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)


class ListQueue:
    """A consume-once RefQueue over a fixed list: ``None`` once drained (a closed producer)."""

    def __init__(self, refs: Sequence[SampleRef]) -> None:
        self._refs = list(refs)
        self.pulled = 0

    def get(self, timeout: float | None = None) -> SampleRef | None:
        if self.pulled >= len(self._refs):
            return None
        self.pulled += 1
        return self._refs[self.pulled - 1]

    def close(self) -> None:
        self._refs = self._refs[: self.pulled]


def ledger_queue(store: FeatureStore, refs: Sequence[SampleRef], batch_size: int, name: str):  # type: ignore[no-untyped-def]
    """A real rank queue: the refs committed to a memory:// ledger, windows cut by the controller.

    One rank, windows of ``batch_size``; the producer is closed, so the queue ends after them.
    """
    from dataflow.control import Controller, WindowShape
    from dataflow.control.ledger import open_ledger

    controller = Controller(open_ledger(f"memory://{name}"), aborter=store)
    consumer = controller.consumer(WindowShape(dp_size=1, batch_size=batch_size), idle_timeout_s=5)
    consumer.open(name)
    producer = controller.producer()
    producer.open(name, resume=True)
    producer.commit(list(refs))
    producer.close()
    return consumer.queue()


def run_rank_processes(
    script: str | Path, args_of: Callable[[int], list[str]], world: int, timeout: float = 180
) -> list[str]:
    """Run ``python script *args_of(rank)`` for every rank at once (one torch thread each, from
    the script's directory); kill them all if one outlives ``timeout``; assert they all exit 0.

    Returns each rank's combined output.
    """
    script = Path(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), *args_of(rank)],
            env=env,
            cwd=script.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(world)
    ]
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        outputs.append(out.decode(errors="replace"))
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    return outputs
