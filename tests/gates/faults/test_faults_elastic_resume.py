"""SIGKILL during an elastic (resharded) resume: the checkpoint survives, the curve is kept.

A real run checkpoints every step at one data-parallel size (FSDP2 over gloo, separate
processes as torchrun starts them, or one process), then resumes at another with the same
global batch; that resume is SIGKILLed right after DCP resharded the model and optimizer into
it (before any step), and again once it wrote its shards of the next checkpoint (before the
rename). A last resume at the new size finishes the run. Checked: every kill leaves the
complete checkpoints loadable and nothing half-written visible, and the whole loss curve and
the final weights equal an uninterrupted one-rank run within 1e-5 (only the reduction order
differs across dp; see packages/dataflow-train/tests/test_elastic_resume.py). The run is the
train package's ``elastic_run.py`` (16 samples, global batch 4, 4 steps). CI: dp 2 → 1, killed
mid-save (the resume's load, resharding and first step already behind it); long: both kill
points, dp 2 → 1 and dp 1 → 2.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from gate_runs import gate_variant

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "packages/dataflow-train/tests"))
from elastic_run import TOTAL_STEPS, launch, run_local

DIRECTIONS = {"ci": [(2, 1)], "long": [(2, 1), (1, 2)]}[gate_variant()]
KILL_POINTS = {"ci": ("saving",), "long": ("loaded", "saving")}[gate_variant()]
TOL = 1e-5
KILLED = -signal.SIGKILL


def _complete(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "ckpt").glob("step-*") if (p / "COMPLETE").is_file())


def _tmp(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "ckpt").glob(".tmp-step-*"))


@pytest.mark.parametrize(("saved_dp", "resumed_dp"), DIRECTIONS)
def test_sigkill_during_a_resharded_resume_keeps_the_checkpoint_and_the_curve(
    saved_dp, resumed_dp, tmp_path, summary
):
    began = time.monotonic()
    straight = run_local(tmp_path / "straight", max_steps=TOTAL_STEPS)
    out = tmp_path / "run"
    out.mkdir()

    codes, reports = launch(saved_dp, out, "--max-steps", "2")
    assert codes == [0] * saved_dp and reports[0] is not None and "error" not in reports[0]
    first = reports[0]["losses"]
    assert _complete(out) == ["step-00000001", "step-00000002"]

    resume = ("--max-steps", "4", "--resume", "--kill-at")
    if "loaded" in KILL_POINTS:
        codes, reports = launch(resumed_dp, out, *resume, "loaded")
        assert codes[0] == KILLED and reports[0] is None  # killed right after the resharded load
        assert _complete(out) == ["step-00000001", "step-00000002"] and _tmp(out) == []
    codes, reports = launch(resumed_dp, out, *resume, "saving")
    assert codes[0] == KILLED and reports[0] is None  # killed with step 3's shards written
    assert _complete(out) == ["step-00000001", "step-00000002"]  # step 3 never renamed
    assert _tmp(out) == [".tmp-step-00000003"]  # half-written, invisible to a resume

    codes, reports = launch(resumed_dp, out, "--max-steps", "4", "--resume")
    assert codes == [0] * resumed_dp, reports
    final = reports[0]
    assert final is not None and final["resumed_from"] == 2, final
    assert sorted(final["losses"]) == ["3", "4"]
    assert _complete(out) == ["step-00000002", "step-00000003", "step-00000004"]
    assert _tmp(out) == []

    curve = {**first, **final["losses"]}
    assert sorted(curve) == sorted(straight["losses"])
    for step, loss in curve.items():
        assert abs(loss - straight["losses"][step]) <= TOL, (step, loss, straight["losses"])
    for name, values in straight["weights"].items():
        torch.testing.assert_close(
            torch.tensor(final["weights"][name]), torch.tensor(values), rtol=0, atol=TOL
        )
    worst = max(abs(curve[s] - straight["losses"][s]) for s in curve)
    summary.append(
        f"faults/elastic: dp {saved_dp} -> {resumed_dp}, SIGKILL at {'+'.join(KILL_POINTS)}: "
        f"checkpoints intact, loss curve within {worst:.1e} of one rank (tol {TOL}), "
        f"{time.monotonic() - began:.0f}s"
    )
