"""Checkpoints are verified against the manifest their run signed before anything is unpickled.

Each refusal names the offending file and leaves every file byte-identical; a tampered newest
checkpoint makes resume fall back to the previous verified one with the same loss curve.
"""

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from train_run import TOTAL_STEPS, build, final_weights

from dataflow.train.checkpoint import CheckpointManager, CheckpointRefusedError
from dataflow.train.checkpoint_manifest import KEY_FILE, MANIFEST_FILE
from dataflow.train.distributed import LocalCollective
from dataflow.train.metrics import read_jsonl


class _Payload:
    """Unpickling this runs ``touch MARKER``: what a malicious ``.metadata`` would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _manager(root: Path, run_id: str = "run") -> CheckpointManager:
    return CheckpointManager(root, LocalCollective(), keep_last=0, run_id=run_id)


def _save(manager: CheckpointManager, step: int, value: float = 1.0):  # type: ignore[no-untyped-def]
    tensors = {"model": {"w": torch.full((4,), value)}}
    return manager.save(step, tensors, {"rank": step}, {"config": {"a": 1}})


def _target() -> dict:
    return {"model": {"w": torch.zeros(4)}}


def _refused(manager: CheckpointManager, info, match: str) -> CheckpointRefusedError:  # type: ignore[no-untyped-def]
    before = _snapshot(manager.root)
    target = _target()
    with pytest.raises(CheckpointRefusedError, match=match) as caught:
        manager.load(info, target)
    with pytest.raises(CheckpointRefusedError, match=match):
        manager.read_shared(info)
    assert _snapshot(manager.root) == before  # nothing changed on disk
    assert torch.equal(target["model"]["w"], torch.zeros(4))  # nothing loaded
    return caught.value


def test_a_saved_checkpoint_has_a_signed_manifest_and_loads(tmp_path):
    manager = _manager(tmp_path)
    info = _save(manager, 1, 2.5)
    assert (info.path / MANIFEST_FILE).is_file()
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    target = _target()
    assert manager.load(info, target) == {"rank": 1}
    assert torch.equal(target["model"]["w"], torch.full((4,), 2.5))


def test_a_malicious_metadata_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    pickle.loads(_malicious_pickle(marker))  # the payload is real: unpickling runs it
    assert marker.exists()
    marker.unlink()
    manager = _manager(tmp_path / "ckpt")
    info = _save(manager, 1)
    (info.path / ".metadata").write_bytes(_malicious_pickle(marker))
    error = _refused(manager, info, r"\.metadata is \d+ bytes, its manifest says")
    assert error.path == info.path / ".metadata"
    assert not marker.exists()


def test_a_same_size_tampered_shard_is_refused_by_its_digest(tmp_path):
    manager = _manager(tmp_path)
    info = _save(manager, 1)
    shard = next(info.path.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    error = _refused(manager, info, f"{shard.name} does not match its SHA-256 in .*{MANIFEST_FILE}")
    assert error.path == shard


def test_a_truncated_shard_is_refused(tmp_path):
    manager = _manager(tmp_path)
    info = _save(manager, 1)
    shard = next(info.path.glob("*.distcp"))
    with shard.open("r+b") as fh:
        fh.truncate(3)
    _refused(manager, info, f"{shard.name} is 3 bytes, its manifest says .*truncated")


def test_a_missing_shard_is_refused(tmp_path):
    manager = _manager(tmp_path)
    info = _save(manager, 1)
    shard = next(info.path.glob("*.distcp"))
    shard.unlink()
    _refused(manager, info, f"checkpoint file .*{shard.name} is missing")


def test_a_checkpoint_without_a_manifest_is_refused(tmp_path):
    manager = _manager(tmp_path)
    info = _save(manager, 1)
    (info.path / MANIFEST_FILE).unlink()
    _refused(manager, info, f"has no manifest .*{MANIFEST_FILE} is missing")


def test_an_unlisted_file_or_an_edited_manifest_is_refused(tmp_path):
    manager = _manager(tmp_path)
    info = _save(manager, 1)
    (info.path / "extra.bin").write_bytes(b"x")
    _refused(manager, info, "extra.bin is not listed in")
    (info.path / "extra.bin").unlink()
    manifest = info.path / MANIFEST_FILE
    manifest.write_text(manifest.read_text().replace('"step": 1', '"step": 2'))
    _refused(manager, info, f"{MANIFEST_FILE} is not signed with this run's key")


def test_another_runs_checkpoint_swapped_in_is_refused(tmp_path):
    ours, theirs = _manager(tmp_path / "ours"), _manager(tmp_path / "theirs")
    _save(ours, 1)
    foreign = _save(theirs, 2, value=7.0)
    swapped = ours.root / foreign.path.name
    shutil.copytree(foreign.path, swapped)
    info = ours.latest()
    assert info is not None and info.path == swapped
    _refused(ours, info, "not signed with this run's key: the checkpoint was written by another")
    # Same directory and key, another run id: refused by the identity in the manifest.
    renamed = _manager(ours.root, run_id="other")
    _refused(renamed, ours.complete()[0], "is of run 'run' step 1, not of run 'other' step 1")


def test_without_the_run_key_nothing_loads(tmp_path):
    manager = _manager(tmp_path)
    info = _save(manager, 1)
    (tmp_path / KEY_FILE).unlink()
    _refused(manager, info, f"checkpoint key .*{KEY_FILE} is missing")


def test_newest_verified_skips_refused_checkpoints_and_names_them(tmp_path):
    manager = _manager(tmp_path)
    for step in (1, 2, 3):
        _save(manager, step)
    (manager.complete()[2].path / ".metadata").write_bytes(b"junk")
    (manager.complete()[1].path / MANIFEST_FILE).unlink()
    info, refused = manager.newest_verified()
    assert info is not None and info.step == 1
    assert [(r.step, r.file.name) for r in refused] == [(3, ".metadata"), (2, MANIFEST_FILE)]


def _losses(out: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_jsonl(out / "metrics.jsonl")}


def test_resume_falls_back_past_a_tampered_checkpoint_and_matches_the_straight_run(tmp_path):
    straight_dir = tmp_path / "straight"
    straight = build(straight_dir, TOTAL_STEPS)
    straight.fit()
    out = tmp_path / "cut"
    assert build(out, 4).fit().step == 4
    ckpt = out / "ckpt"
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000003", "step-00000004"]
    marker = tmp_path / "payload-ran"
    (ckpt / "step-00000004" / ".metadata").write_bytes(_malicious_pickle(marker))
    trainer = build(out, TOTAL_STEPS)
    result = trainer.fit(resume=True)
    assert not marker.exists()
    assert result.resumed_from is not None and result.resumed_from.step == 3
    assert [(r.step, r.file.name) for r in result.refused_checkpoints] == [(4, ".metadata")]
    assert sorted(result.losses) == [4, 5, 6]
    assert _losses(out) == _losses(straight_dir)
    resumed, expected = final_weights(trainer), final_weights(straight)
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_resume_refuses_when_no_checkpoint_verifies_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    assert build(out, 2).fit().step == 2
    ckpt = out / "ckpt"
    for path in ckpt.glob("step-*"):
        (path / MANIFEST_FILE).unlink()
    before = _snapshot(out)
    with pytest.raises(CheckpointRefusedError, match="no checkpoint of this run verifies") as err:
        build(out, TOTAL_STEPS).fit(resume=True)
    assert "step-00000002" in str(err.value) and "step-00000001" in str(err.value)
    assert _snapshot(out) == before
