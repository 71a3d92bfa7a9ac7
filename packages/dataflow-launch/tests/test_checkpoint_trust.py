"""Untrusted checkpoints never run code: ``export`` and ``run --resume`` verify a checkpoint
against the manifest its run signed before anything is unpickled (through the real CLI).

Each refusal names the file, exits 2 with one error line and leaves the run directory
byte-identical; a resume falls back to the previous verified checkpoint and says so.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from run_helpers import EXAMPLES, TINY_RUN, assert_one_error_line, cli, read_jsonl, sets

from dataflow.train.checkpoint import CheckpointManager
from dataflow.train.distributed import LocalCollective

CONFIG = EXAMPLES / "colocated_offline.yaml"
STEP2, STEP4 = "step-00000002", "step-00000004"


def _overrides(out: Path, *extra: str) -> list[str]:
    return sets(
        *TINY_RUN,
        f"run.out_dir={out}",
        f"store.uri=file://{out}/features",
        "data.max_prompts=6",
        "data.passes=2",
        "trainer.total_steps=6",
        "trainer.checkpoint_every=2",
        *extra,
    )


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run stopped at step 4 with checkpoints at steps 2 and 4 (copied by each test)."""
    out = tmp_path_factory.mktemp("trust") / "run"
    result = cli("run", CONFIG, *_overrides(out, "trainer.max_steps=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [STEP2, STEP4]
    return out


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    # The resolved config names the out dir: point it at the copy.
    config = out / "config.yaml"
    config.write_text(config.read_text().replace(str(trained), str(out)))
    return out


def _malicious(out: Path, marker: Path) -> Path:
    target = out / "checkpoints" / STEP4 / ".metadata"
    target.write_bytes(pickle.dumps(_Payload(marker)))
    return target


def _missing_shard(out: Path, _: Path) -> Path:
    shard = next((out / "checkpoints" / STEP4).glob("*.distcp"))
    shard.unlink()
    return shard


def _truncated(out: Path, _: Path) -> Path:
    shard = next((out / "checkpoints" / STEP4).glob("*.distcp"))
    with shard.open("r+b") as fh:
        fh.truncate(10)
    return shard


def _no_manifest(out: Path, _: Path) -> Path:
    manifest = out / "checkpoints" / STEP4 / "MANIFEST.json"
    manifest.unlink()
    return manifest


def _foreign(out: Path, tmp: Path) -> Path:
    # Another run (its own key) saved a checkpoint; it is copied in as the newest one.
    other = CheckpointManager(tmp / "other", LocalCollective(), run_id="colocated-offline")
    info = other.save(9, {"model": {"w": torch.zeros(2)}}, {}, {"config": {}})
    shutil.copytree(info.path, out / "checkpoints" / info.path.name)
    return out / "checkpoints" / info.path.name / "MANIFEST.json"


TAMPERS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "malicious_pickle": (_malicious, "bytes, its manifest says"),
    "missing_shard": (_missing_shard, "is missing (listed in"),
    "truncated": (_truncated, "is 10 bytes, its manifest says"),
    "no_manifest": (_no_manifest, "has no manifest"),
    "another_run": (_foreign, "is not signed with this run's key"),
}


@pytest.mark.parametrize("case", sorted(TAMPERS))
def test_export_refuses_an_unverified_checkpoint_naming_the_file(case, run_copy, tmp_path):
    tamper, why = TAMPERS[case]
    marker = tmp_path / "payload-ran"
    bad = tamper(run_copy, tmp_path)
    before = _snapshot(run_copy)
    draft = tmp_path / "draft"
    result = cli("export", run_copy, "--out", draft, timeout=120)
    line = assert_one_error_line(result, "export", str(bad), why, f"--checkpoint {run_copy}")
    # The newest verified checkpoint is named, not silently exported in its place.
    assert (STEP4 if case == "another_run" else STEP2) in line.split("newest checkpoint")[1]
    assert not marker.exists()
    assert not draft.exists()
    assert _snapshot(run_copy) == before
    if case == "malicious_pickle":
        ok = cli(
            "export", run_copy, "--out", draft, "--checkpoint", run_copy / "checkpoints" / STEP2
        )
        assert ok.returncode == 0, ok.stderr
        assert (draft / "model.safetensors").is_file() and not marker.exists()


def test_resume_falls_back_past_a_malicious_checkpoint_and_says_so(run_copy, tmp_path):
    marker = tmp_path / "payload-ran"
    bad = _malicious(run_copy, marker)
    first = {row["step"]: row["loss"] for row in read_jsonl(run_copy / "metrics.jsonl")}
    result = cli("run", CONFIG, "--resume", *_overrides(run_copy))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists()
    assert f"checkpoint step 4 refused: checkpoint file {bad}" in result.stderr
    assert "falling back to the verified checkpoint of step 2" in result.stderr
    assert "newer checkpoints refused" in result.stdout  # the end summary says so too
    summary = json.loads((run_copy / "summary.json").read_text())
    assert summary["trainer"]["resumed_from_step"] == 2
    assert [str(bad) in r for r in summary["trainer"]["refused_checkpoints"]] == [True]
    rows = read_jsonl(run_copy / "trained.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]  # steps 3, 4 retrained once
    again = {row["step"]: row["loss"] for row in read_jsonl(run_copy / "metrics.jsonl")}
    assert sorted(again) == [1, 2, 3, 4, 5, 6]
    assert {s: again[s] for s in (1, 2, 3, 4)} == first  # the same loss curve, bit for bit


def test_resume_refuses_when_no_checkpoint_verifies_and_changes_nothing(run_copy, tmp_path):
    for step in (STEP2, STEP4):
        (run_copy / "checkpoints" / step / "MANIFEST.json").unlink()
    before = _snapshot(run_copy)
    result = cli("run", CONFIG, "--resume", *_overrides(run_copy, "trainer.max_steps=4"))
    assert_one_error_line(result, "run", "no checkpoint of this run verifies", STEP2, STEP4)
    assert _snapshot(run_copy) == before
