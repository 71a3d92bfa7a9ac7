"""One rank of an elastic-resume run: the same global batch at any data-parallel size.

Usage: [RANK=r WORLD_SIZE=n MASTER_ADDR=... MASTER_PORT=...] python elastic_run.py OUT
--max-steps S [--resume] [--accumulation A] [--kill-at loaded|saving]

With ``WORLD_SIZE`` > 1 (set like torchrun does) the rank runs FSDP2 over gloo; without it,
one process on ``LocalBackend``. 16 samples, batch 1 per rank, a global batch (quantum) of 4:
accumulation ``4 // world`` unless ``--accumulation`` says otherwise. A checkpoint every step
in OUT/ckpt. ``--kill-at loaded`` SIGKILLs rank 0 right after the (resharded) restore, before
any step; ``--kill-at saving`` SIGKILLs it once its shards of the first checkpoint after the
resume are written, before the rename. Each rank writes OUT/report-<rank>.json (losses, full
trainable weights, or the error). ``run_local`` is the same run in the calling process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from dataflow_testing.ports import free_port
from train_support import put_samples, tiny_objective

from dataflow.store import open_store
from dataflow.train.config import TrainerConfig
from dataflow.train.hooks import HookContext, TrainerHook
from dataflow.train.loader import FeatureDataLoader
from dataflow.train.optim import OptimConfig
from dataflow.train.parallel.backend import LocalBackend, TrainBackend
from dataflow.train.trainer import Trainer

SAMPLES, BATCH, QUANTUM, TOTAL_STEPS = 16, 1, 4, 4
CLIP = 0.005  # below every step's gradient norm: clipping is active at each step
LENGTHS = [6, 9]  # padded batches are not involved (batch 1), lengths still vary


class _KillAfterLoad(TrainerHook):
    def on_fit_start(self, context: HookContext) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


def _kill_while_saving(after: int):  # type: ignore[no-untyped-def]
    def hook(phase: str, step: int) -> None:
        if phase == "tensors_written" and step > after:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def build(
    out: Path,
    backend: TrainBackend,
    *,
    max_steps: int,
    accumulation: int | None = None,
    kill_at: str | None = None,
    resumed_step: int = 0,
) -> Trainer:
    """The run's trainer for this rank (the same samples, model and optimizer everywhere)."""
    store = open_store(f"memory://elastic-{backend.rank}", retain_on_release=True)
    refs = put_samples(store, SAMPLES, lengths=LENGTHS)
    dp = backend.data_parallel_size
    loader = FeatureDataLoader(
        store, refs=refs, batch_size=BATCH, seed=4, rank=backend.rank, world_size=dp
    )
    config = TrainerConfig(
        run_id="elastic",
        accumulation_steps=accumulation or QUANTUM // (dp * BATCH),
        optim=OptimConfig(lr=1e-2, max_grad_norm=CLIP),
        max_steps=max_steps,
        total_steps=TOTAL_STEPS,
        checkpoint_interval=1,
        progress=False,
    )
    kill = backend.rank == 0
    return Trainer(
        tiny_objective(seed=3),
        loader,
        config,
        backend=backend,
        hooks=[_KillAfterLoad()] if kill and kill_at == "loaded" else [],
        checkpoint_dir=out / "ckpt",
        checkpoint_fault_hook=(
            _kill_while_saving(resumed_step) if kill and kill_at == "saving" else None
        ),
    )


def trainable_weights(trainer: Trainer) -> dict[str, list[float]]:
    """The full (unsharded) trainable weights, by name (every rank calls this together)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    return {n: v.flatten().tolist() for n, v in full.items() if n in trainable}


def run_local(
    out: Path, *, max_steps: int, resume: bool = False, accumulation: int | None = None
) -> dict[str, Any]:
    """The run on one process (``LocalBackend``), here; returns its report."""
    trainer = build(out, LocalBackend(), max_steps=max_steps, accumulation=accumulation)
    result = trainer.fit(resume=resume)
    return {
        "losses": {str(k): v for k, v in result.losses.items()},
        "weights": trainable_weights(trainer),
        "resumed_from": result.resumed_from.step if result.resumed_from else None,
    }


def launch(
    world: int, out: Path, *args: str, timeout_s: float = 120
) -> tuple[list[int], list[dict[str, Any] | None]]:
    """``world`` real ranks of this script (torchrun-style env); their exit codes and reports
    (None: the rank wrote none, e.g. it was SIGKILLed).
    """
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        env.update(WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), str(out), *args],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    codes = []
    try:
        for proc in procs:
            codes.append(proc.wait(timeout=timeout_s))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    reports = []
    for rank in range(world):
        path = out / f"report-{rank}.json"
        reports.append(json.loads(path.read_text()) if path.exists() else None)
        path.unlink(missing_ok=True)
    return codes, reports


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--accumulation", type=int)
    parser.add_argument("--kill-at", choices=("loaded", "saving"))
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    report: dict[str, Any]
    try:
        if not distributed:
            resumed = _latest_step(args.out) if args.resume else 0
            trainer = build(
                args.out,
                LocalBackend(),
                max_steps=args.max_steps,
                accumulation=args.accumulation,
                kill_at=args.kill_at,
                resumed_step=resumed,
            )
        else:
            from dataflow.train.distributed import init_distributed
            from dataflow.train.parallel.fsdp import FSDPBackend

            ctx = init_distributed(timeout_s=30.0, backend="gloo")
            resumed = _latest_step(args.out) if args.resume else 0
            trainer = build(
                args.out,
                FSDPBackend(ctx),
                max_steps=args.max_steps,
                accumulation=args.accumulation,
                kill_at=args.kill_at,
                resumed_step=resumed,
            )
        result = trainer.fit(resume=args.resume)
        report = {
            "losses": {str(k): v for k, v in result.losses.items()},
            "weights": trainable_weights(trainer),
            "resumed_from": result.resumed_from.step if result.resumed_from else None,
        }
        if distributed:
            from dataflow.train.distributed import shutdown_distributed

            shutdown_distributed(clean=True)
    except BaseException as exc:
        report = {"error_type": type(exc).__name__, "error": str(exc)}
        report["trace"] = traceback.format_exc()[-3000:]
        if distributed:
            from dataflow.train.distributed import shutdown_distributed

            shutdown_distributed(clean=False)
    (args.out / f"report-{rank}.json").write_text(json.dumps(report))


def _latest_step(out: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (out / "ckpt").glob("step-*")]
    return max(steps, default=0)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (c10d finalisation takes seconds)
