"""The Trainer on the sequence-parallel backend: 1 data-parallel group x 2 SP ranks (two real
gloo processes) trains like one rank, and only one rank of the group reports its samples.

Tolerance (fp32): per-step losses ``rtol=1e-5`` and final weights ``rtol=1e-4, atol=1e-6``;
only the summation order differs (shards, all-to-all, SUM over the group).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from dataflow.contracts import InvalidInputError

STEPS, BATCH, LENGTHS = 3, 2, [9, 12, 7, 12, 10, 5]


def _fit(backend, objective, exchange_size: int, dp_rank: int = 0, dp_size: int = 1):
    from train_support import put_samples

    from dataflow.store import open_store
    from dataflow.train.config import TrainerConfig
    from dataflow.train.hooks import AckHook
    from dataflow.train.loader import FeatureDataLoader
    from dataflow.train.optim import OptimConfig
    from dataflow.train.trainer import Trainer

    store = open_store("memory://sp", retain_on_release=True)
    refs = put_samples(store, STEPS * BATCH, lengths=LENGTHS)
    loader = FeatureDataLoader(
        store,
        refs=refs,
        batch_size=BATCH,
        shuffle=False,
        rank=dp_rank,
        world_size=dp_size,
        pad_multiple=exchange_size,
    )
    acked: list[list[str]] = []
    config = TrainerConfig(
        accumulation_steps=1, optim=OptimConfig(lr=1e-2, max_grad_norm=0.5), progress=False
    )
    trainer = Trainer(
        objective,
        loader,
        config,
        backend=backend,
        hooks=[AckHook(lambda step, ids: acked.append(list(ids)))],
    )
    result = trainer.fit()
    weights = {
        n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad
    }
    store.close()
    return [result.losses[s] for s in sorted(result.losses)], acked, weights


def worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from train_support import tiny_config

    from dataflow.train.eagle3 import Eagle3Objective
    from dataflow.train.parallel.sequence import (
        SequenceParallelBackend,
        SequenceParallelObjective,
        init_sequence_parallel,
    )

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        with pytest.raises(InvalidInputError, match=r"2 x 2 = 4, but the job has 2 ranks"):
            init_sequence_parallel(2, 2)
        mesh = init_sequence_parallel(1, 2)
        objective = Eagle3Objective(tiny_config(), seed=0, sequence_parallel=mesh.exchange)
        losses, acked, weights = _fit(
            SequenceParallelBackend(mesh), SequenceParallelObjective(objective, mesh.exchange), 2
        )
        torch.save(weights, os.path.join(out_dir, f"weights{rank}.pt"))
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps({"losses": losses, "acked": acked, "sp_rank": mesh.sp_rank})
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_sequence_parallel_ranks_train_like_one_and_report_each_sample_once(tmp_path):
    from dataflow_testing.ports import free_port
    from train_support import run_rank_processes, tiny_objective

    from dataflow.train.parallel.backend import LocalBackend

    port = free_port()
    run_rank_processes(__file__, lambda rank: [str(rank), str(port), str(tmp_path)], 2)

    losses, acked, weights = _fit(LocalBackend(), tiny_objective(seed=0), 1)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, got in enumerate(ranks):
        assert got["sp_rank"] == r
        assert got["losses"] == pytest.approx(losses, rel=1e-5), r
        got_weights = torch.load(tmp_path / f"weights{r}.pt", weights_only=True)
        # the SP ranks wrap the objective, so their parameter names carry an "objective." prefix
        assert set(got_weights) == {f"objective.{name}" for name in weights}
        for name, value in weights.items():
            torch.testing.assert_close(
                got_weights[f"objective.{name}"], value, rtol=1e-4, atol=1e-6, msg=name
            )
    assert ranks[0]["acked"] == acked and len(acked) == STEPS  # the group's first rank reports
    assert ranks[1]["acked"] == [[]] * STEPS  # its peer read the same batches and reports none


def test_bad_sizes_and_a_missing_process_group_are_refused():
    from dataflow.train.parallel.sequence import init_sequence_parallel

    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidInputError, match=f"dp_size must be an int >= 1, got {bad!r}"):
            init_sequence_parallel(bad, 1)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="needs an initialised process group"):
        init_sequence_parallel(1, 2)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
