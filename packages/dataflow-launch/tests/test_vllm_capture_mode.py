"""``target.vllm.capture_mode`` (file | store) without vLLM: config refusals, the printed server
command, the engine's refusals before any request (tests/vllm run a server in both modes).
"""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from pydantic import ValidationError

from dataflow.contracts import InvalidInputError
from dataflow.launch.config import TargetSection
from dataflow.launch.config.loading import config_from_mapping
from dataflow.launch.engines.vllm import VLLMTargetEngine, open_vllm_engine
from dataflow.launch.engines.vllm_server import printed_command
from dataflow.launch.engines.vllm_wire import eagle3_from_capture, final_norm


def _config(tmp_path, store: str, topology: str = "disaggregated_online", **vllm):
    return {
        "run": {"id": "cm", "out_dir": str(tmp_path / "out"), "topology": topology},
        "target": {
            "engine": "vllm",
            "model_dir": str(tmp_path),
            "vllm": {"capture_mode": "store", **vllm},
        },
        "store": {"uri": store},
        "ledger": {"uri": f"sqlite://{tmp_path}/l.sqlite"} if topology.startswith("disagg") else {},
    }


def test_file_is_the_default_capture_mode(tmp_path):
    assert TargetSection(engine="vllm", model_dir=str(tmp_path)).vllm.capture_mode == "file"


@pytest.mark.parametrize("store", ["shm://cm", "dir:///tmp/cm-store", "mooncake://127.0.0.1:1"])
def test_store_mode_accepts_stores_the_server_can_write(tmp_path, store):
    config = config_from_mapping(_config(tmp_path, store))
    assert config.target.vllm.capture_mode == "store"


def test_store_mode_with_a_store_the_server_cannot_write_is_refused(tmp_path):
    data = _config(tmp_path, "memory://", topology="colocated_online")
    with pytest.raises(
        InvalidInputError, match=r"capture_mode: store .* got engine 'vllm' with 'memory://'"
    ):
        config_from_mapping(data)


def test_store_mode_needs_the_vllm_engine(tmp_path):
    data = _config(tmp_path, "shm://cm")
    data["target"]["engine"] = "hf"
    data["target"].pop("model_dir")
    with pytest.raises(InvalidInputError, match="capture_mode: store .* target.engine vllm"):
        config_from_mapping(data)


def test_an_unknown_capture_mode_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="capture_mode"):
        TargetSection(engine="vllm", model_dir=str(tmp_path), vllm={"capture_mode": "socket"})


def test_vllm_command_prints_store_capture_only_in_store_mode(saved_model_dir):
    def kv(line: str) -> dict:
        argv = shlex.split(line)
        return json.loads(argv[argv.index("--kv-transfer-config") + 1])

    file_mode = TargetSection(engine="vllm", model_dir=str(saved_model_dir))
    store = TargetSection(
        engine="vllm", model_dir=str(saved_model_dir), vllm={"capture_mode": "store"}
    )
    assert (
        "dataflow_store_capture" not in kv(printed_command(file_mode))["kv_connector_extra_config"]
    )
    line = printed_command(store)
    assert kv(line)["kv_connector_extra_config"]["dataflow_store_capture"] is True
    assert "DATAFLOW_STORE_TOKEN=" in line  # a dir:// token travels in the environment


def test_the_engine_refuses_store_mode_without_a_writable_store(saved_model_dir):
    target = TargetSection(
        engine="vllm",
        model_dir=str(saved_model_dir),
        server_url="http://127.0.0.1:9",
        vllm={"capture_mode": "store"},
    )
    with pytest.raises(InvalidInputError, match="needs the run's store URI"):
        open_vllm_engine(target)
    with pytest.raises(
        InvalidInputError, match=r"shm://, dir:// or mooncake://\), got 'memory://'"
    ):
        VLLMTargetEngine(
            "http://127.0.0.1:9",
            str(saved_model_dir),
            dtype="float32",
            capture_mode="store",
            store_uri="memory://",
        )


def test_the_connectors_features_are_the_file_modes():
    # The connector builds the features with the very function file mode's values follow.
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 4, 16, generator=g)
    tokens = torch.arange(7)
    norm = torch.rand(16, generator=g)
    out = eagle3_from_capture(hidden[:5], tokens[:5], [0, 0, 1], norm, 1e-6)
    assert out["input_ids"].tolist() == [[0, 1, 2, 3, 4]]
    assert out["loss_mask"].tolist() == [[0, 0, 1, 1, 1]]  # generated tokens are trained
    assert torch.equal(out["hidden_state"][0], final_norm(hidden[:5, 3], norm, 1e-6))
    assert torch.equal(out["aux_hidden_state"][0], hidden[:5, :3].reshape(5, 48))
