"""Two real gloo ranks (separate processes, as torchrun starts them) against one rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dataflow_testing.ports import free_port
from dist_worker import CLIP, GradNorms, lengths_for
from train_support import put_samples, tiny_objective

from dataflow.store import open_store
from dataflow.train.config import TrainerConfig
from dataflow.train.loader import FeatureDataLoader
from dataflow.train.optim import OptimConfig
from dataflow.train.trainer import Trainer

WORKER = Path(__file__).parent / "dist_worker.py"
PROCESS_TIMEOUT_S = 120


def _launch(scenario: str, out: Path, world: int = 2) -> tuple[list[int], list[dict | None]]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), scenario, str(out)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
    codes = []
    try:
        for proc in procs:
            proc.wait(timeout=PROCESS_TIMEOUT_S)
            codes.append(proc.returncode)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
    reports = []
    for rank in range(world):
        path = out / f"rank-{rank}.json"
        reports.append(json.loads(path.read_text()) if path.exists() else None)
    return codes, reports


def test_two_fsdp_ranks_match_one_rank_and_ack_through_rank_0(tmp_path):
    codes, (r0, r1) = _launch("train", tmp_path)
    assert codes == [0, 0], (r0, r1)

    # One rank, no FSDP, the same global batch: 2 ranks x (1 x 2 accumulation) = 1 x 4.
    store = open_store("memory://one-rank", retain_on_release=True)
    refs = put_samples(store, 8, lengths=[6, 9])
    loader = FeatureDataLoader(store, refs=refs, batch_size=1, seed=4)
    config = TrainerConfig(
        run_id="dist",
        accumulation_steps=4,
        optim=OptimConfig(lr=1e-2, max_grad_norm=CLIP),
        progress=False,
    )
    norms = GradNorms()
    trainer = Trainer(tiny_objective(seed=3), loader, config, hooks=[norms])
    single = trainer.fit().losses

    assert r0["losses"] == r1["losses"]  # every rank logs the rank-averaged loss
    two = {int(k): v for k, v in r0["losses"].items()}
    assert sorted(two) == sorted(single) == [1, 2]
    for step, loss in single.items():
        assert abs(two[step] - loss) <= 1e-5, (step, two[step], loss)
    # the global gradient norm under FSDP (squared shard norms all-reduced) is the full one
    for step, norm in norms.norms.items():
        assert norm > CLIP  # so clipping really scaled every step
        assert abs(r0["grad_norms"][str(step)] - norm) <= 1e-5 * norm
        assert r0["grad_norms"] == r1["grad_norms"]
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            sharded = torch.tensor(r0["weights"][name]).view_as(param)
            torch.testing.assert_close(sharded, param.detach(), rtol=0, atol=1e-5)

    # The distributed ack: rank 0 wrote every window once; each rank freed only its own.
    assert r0["ledger"] == {"trained": 8, "step": 2}
    assert set(r0["freed"]).isdisjoint(r1["freed"])
    assert sorted(r0["freed"] + r1["freed"]) == [r.sample_id for r in refs]
    assert r0["resident"] == r1["resident"] == 4
    step_dir = tmp_path / "ckpt" / "step-00000002"
    assert {"COMPLETE", "rank-0.json", "rank-1.json", "meta.json", "MANIFEST.json"} <= {
        p.name for p in step_dir.iterdir()
    }


def test_a_data_failure_on_rank_1_makes_rank_0_raise_not_hang(tmp_path):
    codes, (r0, r1) = _launch("fail-data", tmp_path)
    assert codes == [0, 0]
    assert r1["error_type"] == "NotFoundError"
    assert r0["error_type"] == "RunFailedError"
    assert "a peer rank failed during data loading: rank 1: NotFoundError" in r0["error"]
    assert r0["fit_s"] < 25  # well inside the 30 s collective timeout: no hang


def test_rank_1_dying_makes_rank_0_raise(tmp_path):
    codes, (r0, r1) = _launch("crash", tmp_path)
    assert codes[1] == 7 and r1 is None
    assert r0["error_type"] == "RunFailedError"
    assert "lost contact with a peer rank during optimizer-step hooks" in r0["error"]
    assert r0["fit_s"] < 25


@pytest.mark.slow
def test_a_hook_failure_on_rank_1_makes_rank_0_raise(tmp_path):
    codes, (r0, r1) = _launch("fail-hook", tmp_path)
    assert codes == [0, 0]
    assert r1["error_type"] == "ValueError"
    assert "optimizer-step hooks: rank 1: ValueError: rank 1's hook broke" in r0["error"]


def _one_rank_losses(lengths) -> dict[int, float]:
    """One rank, no FSDP, the same global batches (batch 1 x accumulation 4), fp32."""
    name = "-".join(map(str, lengths))
    store = open_store(f"memory://one-rank-{name}", retain_on_release=True)
    refs = put_samples(store, 8, lengths=lengths)
    loader = FeatureDataLoader(store, refs=refs, batch_size=1, seed=4)
    config = TrainerConfig(
        run_id="dist",
        accumulation_steps=4,
        optim=OptimConfig(lr=1e-2, max_grad_norm=CLIP),
        progress=False,
    )
    return Trainer(tiny_objective(seed=3), loader, config).fit().losses


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_keeps_fp32_masters(tmp_path):
    codes, (r0, r1) = _launch("train-bf16", tmp_path)
    assert codes == [0, 0], (r0, r1)
    assert r0["param_dtypes"] == ["torch.float32"]  # sharded masters; compute ran in bf16
    fp32 = _one_rank_losses(lengths_for("train-bf16"))
    for step, loss in fp32.items():
        bf16 = r0["losses"][str(step)]
        assert bf16 != loss and abs(bf16 - loss) <= 2e-2 * abs(loss), (step, bf16, loss)


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_to_the_same_step_2(tmp_path):
    straight_dir, cut_dir = tmp_path / "straight", tmp_path / "cut"
    straight_dir.mkdir()
    cut_dir.mkdir()
    codes, (straight, _) = _launch("train", straight_dir)
    assert codes == [0, 0]
    codes, (first, _) = _launch("stop-at-1", cut_dir)
    assert codes == [0, 0] and list(first["losses"]) == ["1"]
    assert first["losses"]["1"] == straight["losses"]["1"]
    codes, (resumed, other) = _launch("resume", cut_dir)
    assert codes == [0, 0], (resumed, other)
    assert list(resumed["losses"]) == ["2"]  # it restarted after step 1
    assert resumed["losses"]["2"] == straight["losses"]["2"]  # DCP shards + per-rank state
    assert resumed["weights"] == straight["weights"]
