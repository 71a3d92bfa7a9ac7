"""Resume continuity: a run cut at step 3 and resumed equals the uninterrupted run, bit for bit."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_run import TOTAL_STEPS, build, final_weights

from dataflow.train.metrics import read_jsonl

SCRIPT = Path(__file__).parent / "train_run.py"


def _losses(out: Path) -> dict[int, float]:
    # A killed run may have logged a step its checkpoint never covered; the resumed run logs it
    # again, and the later row is the one that counts.
    return {row["step"]: row["loss"] for row in read_jsonl(out / "metrics.jsonl")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    trainer = build(out, TOTAL_STEPS)
    result = trainer.fit()
    assert result.step == TOTAL_STEPS
    return _losses(out), final_weights(trainer)


def _resume_and_compare(out: Path, straight) -> None:
    losses, weights = straight
    trainer = build(out, TOTAL_STEPS)
    result = trainer.fit(resume=True)
    assert sorted(result.losses) == [4, 5, 6]  # it really started from step 3
    assert _losses(out) == losses  # bit-identical per-step losses (exact float equality)
    resumed = final_weights(trainer)
    assert resumed.keys() == weights.keys()
    assert all(torch.equal(resumed[k], weights[k]) for k in weights)


def test_clean_stop_at_step_3_then_resume_matches_the_straight_run(tmp_path, straight):
    assert build(tmp_path, 3).fit().step == 3
    _resume_and_compare(tmp_path, straight)


def test_sigkill_after_the_step_3_checkpoint_then_resume_matches(tmp_path, straight):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--kill-after-checkpoint", "3"],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert sorted(_losses(tmp_path)) == [1, 2, 3]
    _resume_and_compare(tmp_path, straight)


def test_sigkill_in_the_middle_of_saving_step_4_leaves_step_3_usable(tmp_path, straight):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--kill-before-rename", "4"],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir() if p.name != ".run-key") == [
        ".tmp-step-00000004",  # fully written but never renamed: not a checkpoint
        "step-00000002",
        "step-00000003",
    ]
    _resume_and_compare(tmp_path, straight)
    assert sorted(p.name for p in ckpt.iterdir() if p.name != ".run-key") == [
        "step-00000005",
        "step-00000006",
    ]
