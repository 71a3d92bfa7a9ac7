"""The trainer on NCCL (FSDP2, one rank per GPU; 1 and 2 GPUs where present), fp32 and bf16,
against one CPU rank training the same samples per step.

Tolerances: fp32 on GPU vs CPU, per-step |Δloss| ≤ 1e-4 and global grad norm within 1e-4
relative (different kernels, same math; TF32 stays off, torch's default for matmuls); bf16
(parameters all-gathered as bf16, fp32 master weights and gradient reduction): |Δloss| ≤ 5e-2
relative to the fp32 CPU loss, every loss finite, the optimizer's parameters still fp32.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from gpu_support import requires_gpus

pytestmark = pytest.mark.gpu

WORKER = Path(__file__).with_name("gpu_worker.py")


def _losses(out: Path) -> tuple[dict[int, float], dict[int, float]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: r["loss"] for r in rows}, {r["step"]: r["grad_norm"] for r in rows}


def _run(args: list[str], env_cpu: bool = False) -> None:
    import os

    env = dict(os.environ)
    if env_cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-5000:]


def _nccl(gpus: int, out: Path, precision: str) -> None:
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={gpus}",
            str(WORKER),
            "nccl",
            str(out),
            precision,
        ]
    )


def _cpu_reference(out: Path, world: int) -> tuple[dict[int, float], dict[int, float]]:
    _run([sys.executable, str(WORKER), "cpu", str(out), str(world)], env_cpu=True)
    return _losses(out)


@pytest.mark.parametrize(
    "gpus", [pytest.param(1, marks=requires_gpus(1)), pytest.param(2, marks=requires_gpus(2))]
)
def test_fp32_on_nccl_matches_one_cpu_rank(gpus, tmp_path):
    ref_loss, ref_norm = _cpu_reference(tmp_path / "cpu", gpus)
    _nccl(gpus, tmp_path / "gpu", "fp32")
    loss, norm = _losses(tmp_path / "gpu")
    assert loss.keys() == ref_loss.keys() and len(loss) >= 4
    for step in loss:
        assert abs(loss[step] - ref_loss[step]) <= 1e-4, (step, loss[step], ref_loss[step])
        assert abs(norm[step] - ref_norm[step]) <= 1e-4 * ref_norm[step], (step, norm, ref_norm)


@pytest.mark.parametrize(
    "gpus", [pytest.param(1, marks=requires_gpus(1)), pytest.param(2, marks=requires_gpus(2))]
)
def test_bf16_on_nccl_tracks_fp32_and_keeps_fp32_master_weights(gpus, tmp_path):
    ref_loss, _ = _cpu_reference(tmp_path / "cpu", gpus)
    _nccl(gpus, tmp_path / "gpu", "bf16")
    loss, _ = _losses(tmp_path / "gpu")
    assert loss.keys() == ref_loss.keys()
    for step in loss:
        assert loss[step] == loss[step] and abs(loss[step]) != float("inf")
        assert abs(loss[step] - ref_loss[step]) <= 5e-2 * abs(ref_loss[step]), (
            step,
            loss,
            ref_loss,
        )
    assert json.loads((tmp_path / "gpu" / "dtypes.json").read_text()) == ["torch.float32"]
