"""One rank of the gate's multi-rank runs (started by ``torchrun --standalone``).

``rank_worker.py dp OUT FEATURES [k=v ...]``: the colocated-offline builder on this rank
(``trainer.dp_size`` = the job's world size, FSDP2 over gloo), training from the feature files
under FEATURES.

``rank_worker.py dpsp OUT FEATURES [k=v ...]``: 4 ranks as 2 data-parallel groups x 2
sequence-parallel (Ulysses) ranks, on the trainer package's ``Trainer`` with the backend below.
The trainer's FSDP2 backend shards over one flat mesh and has no sequence-parallel axis, so this
gate composes one from the public pieces: a replicated model, the objective with a
``UlyssesExchange`` over the SP group, gradients SUM-reduced over SP and averaged over DP before
the global norm is taken (that reduction is what the gate checks against one rank).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).parent))
from equivalence_support import EXAMPLES, TINY

from dataflow.launch.builders.draft import draft_config, vocab_counts
from dataflow.launch.builders.target_side import load_target_side
from dataflow.launch.builders.trainer_path import trainer_config
from dataflow.launch.config import LaunchConfig, load_config
from dataflow.launch.data import load_prompts
from dataflow.store import open_store
from dataflow.train.distributed import FailTogether, TorchCollective
from dataflow.train.eagle3 import Eagle3Objective, build_vocab_map
from dataflow.train.loader import FeatureDataLoader
from dataflow.train.metrics import JsonlMetrics
from dataflow.train.parallel.backend import local_grads, local_sq_norm, scale_grads
from dataflow.train.parallel.ulysses import UlyssesExchange, shard_sequence
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


@dataclass(frozen=True)
class _Output:
    loss: torch.Tensor
    metrics: Mapping[str, torch.Tensor]


class SequenceParallelStep(nn.Module):
    """The objective on this rank's sequence shard; its loss VALUE is the whole sequence's
    (the SP shares summed) while its gradient is this share's, so logging sees full losses and
    the SP gradient sum gives the full-sequence gradient.
    """

    def __init__(self, objective: Eagle3Objective, exchange: UlyssesExchange) -> None:
        super().__init__()
        self.objective = objective
        self.exchange = exchange

    def forward(self, tensors: Mapping[str, torch.Tensor]) -> _Output:
        out = self.objective(shard_sequence(tensors, self.exchange))
        share = out.loss
        whole = self.exchange.sum(share)
        return _Output(share + (whole - share).detach(), out.metrics)


class DataSequenceParallelBackend:
    """A ``TrainBackend`` for dp x sp ranks holding replicated parameters (see module doc)."""

    def __init__(self, dp_size: int, control: dist.ProcessGroup) -> None:
        self._dp = dp_size
        self._fail = FailTogether(control)
        self._collective = TorchCollective(control)

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def collective(self) -> TorchCollective:
        return self._collective

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def set_gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        return None

    def clip_grad_norm(self, params: Iterable[nn.Parameter], max_norm: float | None) -> float:
        grads = local_grads(params)
        for grad in grads:  # SUM over sp (shares of one sequence), mean over dp (samples)
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            grad.div_(self._dp)
        total = float(local_sq_norm(grads).sqrt())
        scale_grads(grads, total, max_norm)
        return total

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        out = values.detach().to(torch.float32).clone()
        dist.all_reduce(out)
        return out / self.world_size

    def agree(self, stage: str, error: BaseException | None, end: bool = False) -> bool:
        return self._fail.agree(stage, error, end)

    def abort(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_dpsp(out: Path, features: Path, extra: list[str], dp: int = 2, sp: int = 2) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    try:
        if dist.get_world_size() != dp * sp:
            raise SystemExit(f"dpsp needs {dp * sp} ranks, got {dist.get_world_size()}")
        mesh = init_device_mesh("cpu", (dp, sp), mesh_dim_names=("dp", "sp"))
        control = dist.new_group(backend="gloo")
        dp_rank = mesh.get_local_rank("dp")
        config = gate_config(out, features, extra)
        target = load_target_side(config)
        prompts = load_prompts(config.data, target.tokenizer)
        eagle = draft_config(config, target)
        exchange = UlyssesExchange(mesh["sp"].get_group())
        objective = Eagle3Objective(eagle, seed=config.run.seed, sequence_parallel=exchange)
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
            rank=dp_rank,
            world_size=dp,
            pad_multiple=sp,
        )
        backend = DataSequenceParallelBackend(dp, control)
        trainer = Trainer(
            SequenceParallelStep(objective, exchange),
            loader,
            trainer_config(config, progress=False),
            backend=backend,
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
