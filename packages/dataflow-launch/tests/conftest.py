"""Shared fixtures: the built-in target is built once per session (transformers is slow to import)."""

from __future__ import annotations

import pytest
from launch_helpers import TINY

from dataflow.launch.config import BuiltinTargetSection, TargetSection


@pytest.fixture(scope="session")
def tiny_target() -> TargetSection:
    """A built-in target small enough for unit tests (fp32 so comparisons are exact)."""
    return TargetSection(builtin=BuiltinTargetSection(**TINY), dtype="float32", batch_size=3)


@pytest.fixture(scope="session")
def tokenizer():
    from dataflow.launch.builtin.tokenizer import load_builtin_tokenizer

    return load_builtin_tokenizer()


@pytest.fixture(scope="session")
def tiny_engine(tiny_target):
    from dataflow.launch.engines.hf import open_hf_engine

    engine = open_hf_engine(tiny_target)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def saved_model_dir(tiny_engine, tmp_path_factory):
    """The tiny built-in target saved as an ordinary local transformers model directory."""
    path = tmp_path_factory.mktemp("tiny-target")
    tiny_engine.model.save_pretrained(path)
    tiny_engine.tokenizer.save_pretrained(path)
    return path


def _vllm_reachable() -> bool:
    import importlib.util
    import os

    return (
        bool(os.environ.get("DATAFLOW_VLLM_PYTHON")) or importlib.util.find_spec("vllm") is not None
    )


# tests/vllm need a real vLLM (the `vllm` nox session, or DATAFLOW_VLLM_PYTHON): elsewhere they
# are not collected at all; where vLLM is present they run, and fail rather than skip.
collect_ignore_glob = [] if _vllm_reachable() else ["vllm/*"]
