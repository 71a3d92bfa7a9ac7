"""Helpers of the vLLM tests (unique module name: tests dirs share sys.path): a tiny LLaMA saved
to disk and the vllm target over it.

The server's Python is ``DATAFLOW_VLLM_PYTHON`` when set (a separate vLLM venv), else this
interpreter (the ``vllm`` nox session installs vLLM beside the packages). A Python without vLLM
fails these tests: they are never skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataflow.launch.config import TargetSection

AUX = (0, 1, 2)
"""The tiny target has 4 layers (too few for the default rule): aux layers 0, 1, 2."""


def vllm_python() -> str:
    """The interpreter that runs the vLLM server (checked to import vllm)."""
    python = os.environ.get("DATAFLOW_VLLM_PYTHON") or sys.executable
    probe = subprocess.run(
        [python, "-c", "import vllm.entrypoints.openai.api_server"],
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )
    if probe.returncode != 0:
        pytest.fail(
            f"{python} cannot import vLLM (set DATAFLOW_VLLM_PYTHON): {probe.stderr[-800:]}"
        )
    return python


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 4-layer LLaMA (hidden 128, 2 heads of 64) in fp32 with the shipped tokenizer."""
    import torch

    from dataflow.launch.builtin.target import build_builtin_target
    from dataflow.launch.config import BuiltinTargetSection

    section = BuiltinTargetSection(
        hidden_size=128, num_layers=4, num_heads=2, num_kv_heads=2, intermediate_size=256, seed=seed
    )
    model, tokenizer = build_builtin_target(section, torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def vllm_target(model_dir: Path, python: str, **extra) -> TargetSection:
    """A ``vllm`` target over ``model_dir`` in fp32 with the tiny target's aux layers."""
    fields = {
        "engine": "vllm",
        "model_dir": str(model_dir),
        "dtype": "float32",
        "aux_layer_ids": AUX,
        "batch_size": 2,
        "request_timeout_s": 60.0,
        "vllm": {"python": python, "max_model_len": 512, "startup_timeout_s": 400.0},
    }
    fields.update(extra)
    return TargetSection(**fields)
