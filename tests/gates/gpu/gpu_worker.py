"""One trainer process of the GPU gates: the trainer on synthetic EAGLE3 samples.

``gpu_worker.py cpu OUT``: one CPU rank (``LocalBackend``, fp32) with ``WORLD`` micro-batches
per optimizer step — the reference.
``gpu_worker.py nccl OUT PRECISION`` (under ``torchrun``, one rank per GPU): FSDP2 over NCCL,
one micro-batch per rank per step, so every layout trains the same samples per step.
Rank 0 writes ``OUT/metrics.jsonl`` and ``OUT/dtypes.json`` (the optimizer's parameter dtypes).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from dataflow.store import open_store
from dataflow.train.config import TrainerConfig
from dataflow.train.eagle3 import Eagle3Config, Eagle3Objective
from dataflow.train.loader import FeatureDataLoader
from dataflow.train.metrics import JsonlMetrics
from dataflow.train.optim import OptimConfig
from dataflow.train.parallel.backend import LocalBackend
from dataflow.train.trainer import Trainer

HIDDEN, VOCAB, SAMPLES = 64, 256, 16


def objective() -> Eagle3Objective:
    config = Eagle3Config(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        draft_vocab_size=128,
        target_layers=(1, 3, 5),
        ttt_length=3,
    )
    return Eagle3Objective(config, seed=7)


def sample(i: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + i)
    length = 48 + 8 * (i % 3)
    mask = torch.ones(1, length, dtype=torch.int64)
    mask[0, :8] = 0
    return {
        "input_ids": torch.randint(0, VOCAB, (1, length), generator=gen),
        "loss_mask": mask,
        "hidden_state": torch.randn(1, length, HIDDEN, generator=gen),
        "aux_hidden_state": torch.randn(1, length, 3 * HIDDEN, generator=gen),
    }


def train(out: Path, backend, rank: int, world: int, accumulation: int) -> None:
    store = open_store("memory://gpu-gate", retain_on_release=True)
    refs = [store.put(f"s{i:03d}", sample(i)) for i in range(SAMPLES)]
    loader = FeatureDataLoader(store, refs=refs, batch_size=1, seed=0, rank=rank, world_size=world)
    config = TrainerConfig(
        run_id="gpu-gate",
        accumulation_steps=accumulation,
        optim=OptimConfig(lr=1e-2, warmup_steps=1, max_grad_norm=0.5),
        seed=0,
        progress=False,
    )
    trainer = Trainer(
        objective(),
        loader,
        config,
        backend=backend,
        metrics=JsonlMetrics(out / "metrics.jsonl") if rank == 0 else None,
    )
    trainer.fit()
    if rank == 0:
        dtypes = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
        (out / "dtypes.json").write_text(json.dumps(dtypes))


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    if mode == "cpu":
        world = int(sys.argv[3])
        train(out, LocalBackend("fp32"), 0, 1, accumulation=world)
        return
    from dataflow.train.distributed import init_distributed, shutdown_distributed
    from dataflow.train.parallel.fsdp import FSDPBackend

    context = init_distributed()
    assert context.device.type == "cuda", context.device
    ok = False
    try:
        train(out, FSDPBackend(context, sys.argv[3]), context.rank, context.world_size, 1)
        ok = True
    finally:
        shutdown_distributed(ok)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
