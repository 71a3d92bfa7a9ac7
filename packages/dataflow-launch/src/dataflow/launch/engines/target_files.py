"""Reading a local model directory without instantiating the model: config facts and the two
weights EAGLE3 reuses (token embedding and LM head), read tensor by tensor from safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dataflow.contracts import InvalidInputError

EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"


def read_model_config(model_dir: str) -> dict[str, Any]:
    """``config.json`` of a model directory (the text sub-config for multimodal models)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise InvalidInputError(f"target.model_dir {model_dir!r} does not exist")
    file = path / "config.json"
    if not file.is_file():
        raise InvalidInputError(
            f"target.model_dir {model_dir!r} is not a model directory: it has no config.json"
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{file}: not valid JSON ({exc})") from None
    text = config.get("text_config")
    return dict(text) if isinstance(text, dict) else dict(config)


def _weight_files(path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {key: path / name for key, name in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise InvalidInputError(f"target.model_dir {str(path)!r} has no safetensors weights")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as handle:
        return {key: single for key in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)


def read_head_weights(model_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embed_weight, lm_head_weight)`` from the directory's safetensors files; a model with
    tied embeddings (no ``lm_head.weight``) returns the embedding twice.
    """
    from safetensors import safe_open

    files = _weight_files(Path(model_dir))
    if EMBED_KEY not in files:
        raise InvalidInputError(f"target.model_dir {model_dir!r} has no {EMBED_KEY!r} tensor")
    loaded = {}
    for key in (EMBED_KEY, LM_HEAD_KEY):
        if key in files:
            with safe_open(str(files[key]), framework="pt") as handle:
                loaded[key] = handle.get_tensor(key)
    return loaded[EMBED_KEY], loaded.get(LM_HEAD_KEY, loaded[EMBED_KEY])
