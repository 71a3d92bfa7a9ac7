"""One deterministic single-rank training run, as a process the resume tests can SIGKILL.

Usage: python train_run.py OUT_DIR --max-steps N [--resume] [--kill-after-checkpoint S]
[--kill-before-rename S]. Per-step metrics land in OUT_DIR/metrics.jsonl, checkpoints in
OUT_DIR/ckpt, the final trainable weights in OUT_DIR/final.pt.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_support import put_samples, tiny_objective

from dataflow.store import open_store
from dataflow.train.config import TrainerConfig
from dataflow.train.hooks import TrainerHook
from dataflow.train.loader import FeatureDataLoader
from dataflow.train.metrics import JsonlMetrics
from dataflow.train.optim import OptimConfig
from dataflow.train.trainer import Trainer

TOTAL_STEPS = 6


class KillAfterCheckpoint(TrainerHook):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, step: int, path: str) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def build(out: Path, max_steps: int, hooks=(), fault_hook=None, lr: float = 1e-2) -> Trainer:
    store = open_store("memory://run", retain_on_release=True)
    refs = put_samples(store, 8, lengths=[6, 9, 12])
    loader = FeatureDataLoader(store, refs=refs, batch_size=2, seed=11, num_epochs=3, prefetch=2)
    config = TrainerConfig(
        run_id="resume",
        accumulation_steps=2,
        max_steps=max_steps,
        total_steps=TOTAL_STEPS,
        optim=OptimConfig(lr=lr, warmup_steps=2, max_grad_norm=0.5),
        checkpoint_interval=1,
        keep_last=2,
        progress=False,
    )
    return Trainer(
        tiny_objective(seed=3),
        loader,
        config,
        hooks=hooks,
        metrics=JsonlMetrics(out / "metrics.jsonl"),
        checkpoint_dir=out / "ckpt",
        checkpoint_fault_hook=fault_hook,
    )


def final_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-steps", type=int, default=TOTAL_STEPS)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-after-checkpoint", type=int)
    parser.add_argument("--kill-before-rename", type=int)
    args = parser.parse_args()
    hooks = [KillAfterCheckpoint(args.kill_after_checkpoint)] if args.kill_after_checkpoint else []

    def fault(phase: str, step: int) -> None:
        if phase == "before_rename" and step == args.kill_before_rename:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer = build(args.out, args.max_steps, hooks, fault)
    trainer.fit(resume=args.resume)
    torch.save(final_weights(trainer), args.out / "final.pt")


if __name__ == "__main__":
    main()
