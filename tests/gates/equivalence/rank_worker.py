"""One rank of the gate's multi-rank runs (started by ``torchrun --standalone``).

``rank_worker.py dp OUT FEATURES [k=v ...]``: the colocated-offline builder on this rank,
training from the feature files under FEATURES, exactly as `dataflow-launch run` under torchrun
would: ``trainer.dp_size`` x ``trainer.sp_size`` = the job's world size (FSDP2 over gloo, or
with ``sp_size > 1`` the trainer's data x sequence-parallel backend). Rank 0 then exports the
draft from the final checkpoint into OUT/draft, as `run` does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from equivalence_support import EXAMPLES, TINY

from dataflow.launch.config import LaunchConfig, load_config


def gate_config(out: Path, features: Path, extra: list[str]) -> LaunchConfig:
    return load_config(
        EXAMPLES / "colocated_offline.yaml",
        [*TINY, f"run.out_dir={out}", f"store.uri=file://{features}", *extra],
    )


def run_dp(out: Path, features: Path, extra: list[str]) -> None:
    from dataflow.launch.builders.export import export_from_checkpoint
    from dataflow.launch.builders.offline import run_colocated_offline
    from dataflow.launch.run_dir import RunDir

    config = gate_config(out, features, extra)
    run_colocated_offline(config, RunDir(out), resume=False, progress=False)
    if os.environ.get("RANK", "0") == "0":  # as `run` finishes: the draft from the checkpoint
        export_from_checkpoint(config, RunDir(out), "sglang", out / "draft")


def main() -> None:
    mode, out, features, *extra = sys.argv[1:]
    torch.set_num_threads(1)
    if mode == "dp":
        run_dp(Path(out), Path(features), extra)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
