"""One rank of the gate's multi-rank runs (started by ``torchrun --standalone``).

``rank_worker.py dp OUT FEATURES [k=v ...]``: the colocated-offline builder on this rank
(``trainer.dp_size`` = the job's world size, FSDP2 over gloo), training from the feature files
under FEATURES.

``rank_worker.py dpsp OUT FEATURES [k=v ...]``: 4 ranks as 2 data-parallel groups x 2
sequence-parallel (Ulysses) ranks, on the trainer package's ``Trainer`` with its
``SequenceParallelBackend`` (replicated parameters, gradients SUM-reduced over SP and averaged
over DP before the global norm is taken: the reduction the gate checks against one rank).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from equivalence_support import EXAMPLES, TINY

from dataflow.launch.builders.draft import draft_config, vocab_counts
from dataflow.launch.builders.target_side import load_target_side
from dataflow.launch.builders.trainer_path import trainer_config
from dataflow.launch.config import LaunchConfig, load_config
from dataflow.launch.data import load_prompts
from dataflow.store import open_store
from dataflow.train.eagle3 import Eagle3Objective, build_vocab_map
from dataflow.train.loader import FeatureDataLoader
from dataflow.train.metrics import JsonlMetrics
from dataflow.train.parallel.sequence import (
    SequenceParallelBackend,
    SequenceParallelObjective,
    init_sequence_parallel,
)
from dataflow.train.trainer import Trainer


def gate_config(out: Path, features: Path, extra: list[str]) -> LaunchConfig:
    return load_config(
        EXAMPLES / "colocated_offline.yaml",
        [*TINY, f"run.out_dir={out}", f"store.uri=file://{features}", *extra],
    )


def run_dp(out: Path, features: Path, extra: list[str]) -> None:
    from dataflow.launch.builders.offline import run_colocated_offline
    from dataflow.launch.run_dir import RunDir

    config = gate_config(out, features, extra)
    run_colocated_offline(config, RunDir(out), resume=False, progress=False)


def run_dpsp(out: Path, features: Path, extra: list[str], dp: int = 2, sp: int = 2) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    try:
        mesh = init_sequence_parallel(dp, sp)
        config = gate_config(out, features, extra)
        target = load_target_side(config)
        prompts = load_prompts(config.data, target.tokenizer)
        eagle = draft_config(config, target)
        objective = Eagle3Objective(eagle, seed=config.run.seed, sequence_parallel=mesh.exchange)
        objective.init_from_target(target.embed_weight, target.lm_head_weight)
        objective.set_vocab_map(
            *build_vocab_map(dict(vocab_counts(prompts)), target.vocab_size, eagle.draft_vocab_size)
        )
        store = open_store(config.store.uri)
        loader = FeatureDataLoader(
            store,
            refs=store.refs(),  # type: ignore[attr-defined]
            batch_size=config.trainer.batch_size,
            seed=config.run.seed,
            rank=mesh.dp_rank,
            world_size=mesh.dp_size,
            pad_multiple=mesh.sp_size,
        )
        trainer = Trainer(
            SequenceParallelObjective(objective, mesh.exchange),
            loader,
            trainer_config(config, progress=False),
            backend=SequenceParallelBackend(mesh),
            metrics=JsonlMetrics(out / "metrics.jsonl") if dist.get_rank() == 0 else None,
        )
        trainer.fit()
        store.close()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    mode, out, features, *extra = sys.argv[1:]
    torch.set_num_threads(1)
    if mode == "dp":
        run_dp(Path(out), Path(features), extra)
    elif mode == "dpsp":
        run_dpsp(Path(out), Path(features), extra)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
