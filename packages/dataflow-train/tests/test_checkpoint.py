import json
import random

import numpy as np
import pytest
import torch

from dataflow.contracts import CorruptRecordError, InvalidInputError, NotFoundError
from dataflow.train.checkpoint import CheckpointManager, config_differences, fingerprint
from dataflow.train.distributed import LocalCollective
from dataflow.train.rng import capture_rng, restore_rng


def _save(manager, step, value=0.0):
    tensors = {"model": {"w": torch.full((3,), value)}}
    return manager.save(step, tensors, {"note": f"rank state {step}"}, {"config": {"a": 1}})


def test_rng_state_round_trips_through_json():
    state = json.loads(json.dumps(capture_rng()))
    first = (torch.rand(4), random.random(), np.random.rand(2))
    restore_rng(state)
    again = (torch.rand(4), random.random(), np.random.rand(2))
    assert torch.equal(first[0], again[0])
    assert first[1] == again[1]
    assert np.array_equal(first[2], again[2])


def test_keep_last_rotates_and_zero_keeps_all(tmp_path):
    rotating = CheckpointManager(tmp_path / "r", LocalCollective(), keep_last=2)
    keeping = CheckpointManager(tmp_path / "k", LocalCollective(), keep_last=0)
    for step in (1, 2, 3, 4):
        _save(rotating, step)
        _save(keeping, step)
    assert [c.step for c in rotating.complete()] == [3, 4]
    assert [c.step for c in keeping.complete()] == [1, 2, 3, 4]


def test_load_returns_the_saved_tensors_and_rank_state(tmp_path):
    manager = CheckpointManager(tmp_path, LocalCollective())
    info = _save(manager, 7, value=2.5)
    target = {"model": {"w": torch.zeros(3)}}
    state = manager.load(manager.latest(), target)
    assert info.step == 7 and state == {"note": "rank state 7"}
    assert torch.equal(target["model"]["w"], torch.full((3,), 2.5))
    assert manager.read_shared(info) == {"config": {"a": 1}, "step": 7}


def test_saving_an_older_step_forks_and_drops_the_newer_ones(tmp_path):
    manager = CheckpointManager(tmp_path, LocalCollective(), keep_last=0)
    for step in (1, 2, 3):
        _save(manager, step)
    _save(manager, 2, value=9.0)  # a run resumed from step 1 reaches step 2 again
    assert [c.step for c in manager.complete()] == [1, 2]


def test_incomplete_or_corrupt_checkpoints_are_refused(tmp_path):
    manager = CheckpointManager(tmp_path, LocalCollective())
    info = _save(manager, 1)
    (info.path / "COMPLETE").unlink()
    assert manager.latest() is None
    with pytest.raises(NotFoundError, match="not a complete checkpoint"):
        manager.resolve(info.path)
    info = _save(manager, 2)
    (info.path / "meta.json").write_text("{not json")
    with pytest.raises(CorruptRecordError, match="meta.json is 9 bytes, its manifest says"):
        manager.read_shared(info)
    with pytest.raises(InvalidInputError, match="keep_last must be >= 0"):
        CheckpointManager(tmp_path, LocalCollective(), keep_last=-1)


def test_config_differences_name_each_nested_field():
    saved = {"trainer": {"lr": 0.1, "seed": 1}, "world_size": 2}
    now = {"trainer": {"lr": 0.2, "seed": 1}, "world_size": 2, "extra": {"x": 1}}
    assert config_differences(saved, now) == [
        "extra.x: saved '<absent>', now 1",
        "trainer.lr: saved 0.1, now 0.2",
    ]
    assert fingerprint(saved) == fingerprint(json.loads(json.dumps(saved)))
    assert fingerprint(saved) != fingerprint(now)
