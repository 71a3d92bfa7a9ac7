"""Writing the built-in target as a model directory that transformers and vLLM load."""

from __future__ import annotations

from pathlib import Path

import torch

from dataflow.contracts import InvalidInputError
from dataflow.launch.config import BuiltinTargetSection


def save_builtin_target(
    section: BuiltinTargetSection, out_dir: str | Path, dtype: torch.dtype = torch.float32
) -> Path:
    """Write the built-in target of ``section`` to ``out_dir``: ``config.json``,
    ``model.safetensors``, ``generation_config.json`` and the tokenizer files (with the chat
    template).

    Guarantees: ``AutoModelForCausalLM.from_pretrained(out_dir)`` gives the same logits as
    :func:`~dataflow.launch.builtin.target.build_builtin_target` (same dtype); vLLM serves it;
    the directory is usable as ``target.model_dir``. A non-empty ``out_dir`` is refused and
    left as it was.
    """
    from dataflow.launch.builtin.target import build_builtin_target

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(f"target save: {str(out)!r} exists and is not an empty directory")
    model, tokenizer = build_builtin_target(section, dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
