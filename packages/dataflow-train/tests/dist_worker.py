"""One rank of a multi-process training job (launched by the tests like torchrun would).

Usage: RANK=r WORLD_SIZE=n MASTER_ADDR=... MASTER_PORT=... python dist_worker.py SCENARIO OUT
Scenarios: ``train`` (FSDP2 run, ledger ack, checkpoints; ``train-bf16`` the same in bf16), ``fail-data`` (rank 1's store loses a
sample of its 2nd batch), ``fail-hook`` (rank 1's hook raises at step 1), ``crash`` (rank 1
exits abruptly at step 1), ``stop-at-1`` then ``resume`` (a 2-rank checkpoint and its
resume). Each rank writes OUT/rank-<r>.json with what it saw.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_support import put_samples, tiny_objective

from dataflow.control.ledger import open_ledger
from dataflow.store import open_store
from dataflow.train.config import TrainerConfig
from dataflow.train.distributed import init_distributed, shutdown_distributed
from dataflow.train.hooks import AckHook, LedgerAck, TrainerHook
from dataflow.train.loader import FeatureDataLoader
from dataflow.train.optim import OptimConfig
from dataflow.train.parallel.fsdp import FSDPBackend
from dataflow.train.trainer import Trainer

SAMPLES, BATCH, ACCUM = 8, 1, 2  # per rank: 2 micro-batches of 1 per optimizer step
FIT_STARTED = [0.0]  # when fit began: the failure tests time how long it took to fail


CLIP = 0.005  # below every step's gradient norm here: clipping is active at each step


class GradNorms(TrainerHook):
    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    def on_optimizer_step(self, event):
        self.norms[event.step] = event.grad_norm


class Misbehave(TrainerHook):
    def __init__(self, how: str) -> None:
        self.how = how

    def on_optimizer_step(self, event):
        if event.step == 1 and self.how == "fail-hook":
            raise ValueError("rank 1's hook broke")
        if event.step == 1 and self.how == "crash":
            os._exit(7)


def run(scenario: str, out: Path) -> dict:
    ctx = init_distributed(timeout_s=30.0, backend="gloo")
    store = open_store("memory://rank", retain_on_release=True)
    refs = put_samples(store, SAMPLES, lengths=lengths_for(scenario))
    loader = FeatureDataLoader(
        store, refs=refs, batch_size=BATCH, seed=4, rank=ctx.rank, world_size=ctx.world_size
    )
    ledger = None
    if ctx.rank == 0:
        ledger = open_ledger("memory://dist")
        ledger.open_run("dist", BATCH * ACCUM * ctx.world_size, resume=False)
        ledger.commit(refs)
        while ledger.assign_window(ctx.world_size, BATCH * ACCUM) is not None:
            pass
    freed: list[str] = []

    def free_local(step: int, ids: list[str]) -> None:
        for sid in ids:
            store.abort(sid, f"trained at step {step}")
        freed.extend(ids)

    norms = GradNorms()
    hooks: list[TrainerHook] = [AckHook(LedgerAck(ctx.collective, ledger, free_local)), norms]
    if ctx.rank == 1 and scenario in ("fail-hook", "crash"):
        hooks.append(Misbehave(scenario))
    if ctx.rank == 1 and scenario == "fail-data":
        store.abort(loader_second_batch_first_id(refs, ctx.world_size), "lost")
    config = TrainerConfig(
        run_id="dist",
        accumulation_steps=ACCUM,
        optim=OptimConfig(lr=1e-2, max_grad_norm=CLIP),
        max_steps=1 if scenario == "stop-at-1" else None,
        total_steps=2,
        checkpoint_interval=2,
        progress=False,
    )
    trainer = Trainer(
        tiny_objective(seed=3),
        loader,
        config,
        backend=FSDPBackend(ctx, "bf16" if scenario == "train-bf16" else "fp32"),
        hooks=hooks,
        checkpoint_dir=out / "ckpt",
    )
    FIT_STARTED[0] = time.monotonic()
    result = trainer.fit(resume=scenario == "resume")
    report = {
        "losses": result.losses,
        "grad_norms": norms.norms,
        "freed": freed,
        "resident": store.health().resident_samples,
        "param_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters()}),
        "weights": {name: values for name, values in gathered_weights(trainer).items()},
    }
    if ledger is not None:
        status = ledger.status()
        report["ledger"] = {
            "trained": status.samples["trained"],
            "step": status.markers.trained_step,
        }
    shutdown_distributed(clean=True)
    return report


def lengths_for(scenario: str) -> list[int]:
    # The bf16 scenario uses unpadded batches: it checks FSDP's mixed precision, not padding.
    return [8] if scenario == "train-bf16" else [6, 9]


def loader_second_batch_first_id(refs, world_size: int) -> str:
    probe = FeatureDataLoader(
        open_store("memory://probe"),
        refs=refs,
        batch_size=BATCH,
        seed=4,
        rank=1,
        world_size=world_size,
    )
    plan = list(probe._plan.batches(0, 0))  # the plan only: nothing is fetched
    return plan[1][0].sample_id


def gathered_weights(trainer: Trainer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    return {n: v.flatten().tolist() for n, v in full.items() if n in trainable}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    try:
        report = run(scenario, out)
    except BaseException as exc:
        report = {
            "error_type": type(exc).__name__,
            "error": str(exc),
            "trace": traceback.format_exc()[-3000:],
        }
        shutdown_distributed(clean=False)
    report["fit_s"] = time.monotonic() - FIT_STARTED[0] if FIT_STARTED[0] else None
    (out / f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
    # The report is written; skip interpreter teardown (c10d and module finalisation take
    # seconds and the tests only wait for the exit).
    sys.stdout.flush()
    os._exit(0)
