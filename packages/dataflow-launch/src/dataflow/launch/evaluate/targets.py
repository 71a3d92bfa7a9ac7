"""The target an ``eval`` decodes with: a model directory, or the built-in target."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dataflow.launch.config import BuiltinTargetSection


@dataclass(frozen=True)
class EvalTarget:
    """Exactly one of ``model_dir`` (a transformers directory) and ``builtin``."""

    model_dir: Path | None = None
    builtin: BuiltinTargetSection | None = None

    def describe(self) -> str:
        """The target in words (a path, or the built-in target's weights)."""
        if self.model_dir is not None:
            return str(self.model_dir)
        assert self.builtin is not None
        return f"built-in ({self.builtin.weights} weights)"


def load_target(target: EvalTarget, dtype: torch.dtype) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``target`` under transformers, in ``dtype``."""
    if target.model_dir is not None:
        from dataflow.launch.engines.hf import load_model_dir

        name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
        return load_model_dir(str(target.model_dir), name)
    from dataflow.launch.builtin.target import build_builtin_target

    assert target.builtin is not None
    return build_builtin_target(target.builtin, dtype)


def target_dir(target: EvalTarget, scratch: Path | None = None) -> Path:
    """A model directory of ``target`` (the built-in one is saved into a fresh directory under
    ``scratch`` or the system temp dir, in fp32).
    """
    if target.model_dir is not None:
        return target.model_dir
    from dataflow.launch.builtin.save import save_builtin_target

    assert target.builtin is not None
    out = Path(tempfile.mkdtemp(prefix="target-", dir=scratch)) / "model"
    return save_builtin_target(target.builtin, out, torch.float32)
