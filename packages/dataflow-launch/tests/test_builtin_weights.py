"""The built-in target's weights: ``random`` by default (the former shape), ``trained`` opt-in
(the shipped asset, checksummed; missing or damaged → a clear error naming what to do).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib.resources import files
from pathlib import Path

import pytest

from dataflow.contracts import CorruptRecordError, InvalidInputError, NotFoundError
from dataflow.launch.builtin.target import TRAINED_META, TRAINED_WEIGHTS, trained_weights
from dataflow.launch.config import BuiltinTargetSection, load_config
from dataflow.launch.config.sections import RANDOM_BUILTIN_SHAPE, TRAINED_BUILTIN_SHAPE

ASSETS = Path(str(files("dataflow.launch").joinpath("assets")))


def _shape(section: BuiltinTargetSection) -> dict[str, int]:
    return {name: getattr(section, name) for name in RANDOM_BUILTIN_SHAPE}


def test_default_is_random_with_the_former_shape_and_trained_is_opt_in():
    assert BuiltinTargetSection().weights == "random"
    assert _shape(BuiltinTargetSection()) == RANDOM_BUILTIN_SHAPE
    assert load_config(None, []).target.builtin.weights == "random"
    trained = load_config(None, ["target.builtin.weights=trained"]).target.builtin
    assert _shape(trained) == TRAINED_BUILTIN_SHAPE
    with pytest.raises(InvalidInputError, match="the trained built-in target has shape"):
        load_config(None, ["target.builtin.weights=trained", "target.builtin.hidden_size=64"])


def test_trained_weights_missing_names_the_script(tmp_path):
    with pytest.raises(NotFoundError, match=r"python -m dataflow\.launch\.builtin\.train_target"):
        trained_weights(tmp_path)


def test_trained_weights_damaged_are_refused(tmp_path):
    shutil.copy(ASSETS / TRAINED_WEIGHTS, tmp_path / TRAINED_WEIGHTS)
    shutil.copy(ASSETS / TRAINED_META, tmp_path / TRAINED_META)
    body = bytearray((tmp_path / TRAINED_WEIGHTS).read_bytes())
    body[-1] ^= 0xFF
    (tmp_path / TRAINED_WEIGHTS).write_bytes(bytes(body))
    with pytest.raises(CorruptRecordError, match="sha256"):
        trained_weights(tmp_path)


def test_shipped_trained_asset_is_small_checksummed_and_loads():
    weights = ASSETS / TRAINED_WEIGHTS
    assert weights.stat().st_size <= 10 * 1024 * 1024
    meta = json.loads((ASSETS / TRAINED_META).read_text())
    assert meta["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    tensors = trained_weights()
    assert tensors["model.embed_tokens.weight"].shape[1] == TRAINED_BUILTIN_SHAPE["hidden_size"]
