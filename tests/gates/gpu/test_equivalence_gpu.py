"""The equivalence gate on GPU: the colocated-offline builder on 2 GPUs (FSDP2 over NCCL, one
sample per rank per step) against the gate's one-CPU-rank reference on the same features.

Tolerance (fp32, GPU kernels vs CPU kernels): per-step |Δloss| ≤ 1e-4 and the logged global
gradient norm within 1e-4 relative.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from gpu_support import requires_gpus

EQUIVALENCE = Path(__file__).resolve().parents[1] / "equivalence"
sys.path.insert(0, str(EQUIVALENCE))

from equivalence_support import STEPS, curve, run_topology, trained_steps  # noqa: E402

pytestmark = [pytest.mark.gpu, requires_gpus(2)]


def test_two_gpu_ranks_match_the_cpu_reference(tmp_path, monkeypatch):
    reference = tmp_path / "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    run_topology("colocated_offline", reference, f"store.uri=file://{reference}/features")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    out = tmp_path / "nccl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(EQUIVALENCE / "rank_worker.py"),
            "dp",
            str(out),
            str(reference / "features"),
            "trainer.dp_size=2",
            "trainer.accumulation_steps=1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-5000:]
    ref, got = curve(reference), curve(out)
    assert ref.steps == got.steps == STEPS
    for step in ref.loss:
        assert abs(got.loss[step] - ref.loss[step]) <= 1e-4, (step, got.loss, ref.loss)
        rel = abs(got.grad_norm[step] - ref.grad_norm[step]) / ref.grad_norm[step]
        assert rel <= 1e-4, (step, got.grad_norm, ref.grad_norm)
    assert [sorted(s) for s in trained_steps(out)] == [sorted(s) for s in trained_steps(reference)]
