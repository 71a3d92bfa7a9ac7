"""Fixtures of the vLLM tests: the tiny LLaMA on disk and one real vLLM server for the session
(a test that kills it starts it again)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_helpers import save_tiny_llama, vllm_python, vllm_target


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def server_python() -> str:
    return vllm_python()


@pytest.fixture(scope="session")
def server(model_dir, server_python) -> Iterator:
    """One managed vLLM server for the session (each start costs about a minute on 2 cores)."""
    from dataflow.launch.engines.vllm_server import ManagedVLLMServer

    managed = ManagedVLLMServer(vllm_target(model_dir, server_python))
    managed.start()
    yield managed
    managed.stop()
