"""The vllm engine's config and server command line (no vLLM needed; tests/vllm run a server)."""

from __future__ import annotations

import json
import shlex
import tempfile

import pytest
from pydantic import ValidationError

from dataflow.launch.config import TargetSection
from dataflow.launch.engines.vllm_server import printed_command, server_command
from dataflow.launch.engines.vllm_wire import final_norm, vllm_layer_ids


def test_vllm_needs_a_model_dir():
    with pytest.raises(ValidationError, match="model_dir: required by the vllm engine"):
        TargetSection(engine="vllm")


def test_unknown_vllm_keys_are_refused(saved_model_dir):
    with pytest.raises(ValidationError, match="nope"):
        TargetSection(engine="vllm", model_dir=str(saved_model_dir), vllm={"nope": 1})


def test_layer_ids_map_onto_vllms_convention():
    # our id k = output of decoder layer k = vLLM id k + 1; then the last layer (pre-norm)
    assert vllm_layer_ids((1, 3, 4), 8) == [2, 4, 5, 8]


def test_the_server_command_carries_the_configs_flags(saved_model_dir, tmp_path):
    target = TargetSection(
        engine="vllm",
        model_dir=str(saved_model_dir),
        dtype="float32",
        vllm={"python": "/opt/v/bin/python", "max_model_len": 256, "extra_args": ["--seed", "3"]},
    )
    argv = server_command(target, port=8011, capture_dir=str(tmp_path))
    assert argv[:3] == ["/opt/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec["method"] == "extract_hidden_states"
    ids = spec["draft_model_config"]["hf_config"]["eagle_aux_hidden_state_layer_ids"]
    n = 8  # the session's tiny built-in target
    assert ids == [2, n // 2, n - 3, n]  # default rule [1, N//2-1, N-4], each + 1, then N
    kv = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert kv["kv_connector_module_path"] == "dataflow.launch.engines.vllm_connector"
    assert kv["kv_connector_extra_config"] == {"shared_storage_path": str(tmp_path)}
    for flag in ("--no-enable-prefix-caching", "--enforce-eager"):
        assert flag in argv
    assert argv[argv.index("--dtype") + 1] == "float32"
    assert argv[argv.index("--port") + 1] == "8011"
    assert argv[-2:] == ["--seed", "3"]
    line = printed_command(target)
    assert line.startswith("VLLM_CPU_KVCACHE_SPACE=1 ")
    default_dir = f"{tempfile.gettempdir()}/dataflow-vllm-captures"
    assert shlex.split(line)[1:] == server_command(target, port=8000, capture_dir=default_dir)


def test_final_norm_matches_transformers_rmsnorm():
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 16)
    assert torch.equal(final_norm(x, norm.weight.detach(), 1e-5), norm(x).detach())
