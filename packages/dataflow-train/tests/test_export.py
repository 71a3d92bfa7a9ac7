"""Export: SGLang EAGLE3 draft directory and HF directory; names, shapes, config, round trip.

The expected names and config fields below were checked against SGLang's
``python/sglang/srt/models/llama_eagle3.py`` (``LlamaForCausalLMEagle3.load_weights``) and
``python/sglang/srt/model_executor/model_runner.py`` (``eagle_config``); see the package README.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dataflow.contracts.errors import InvalidInputError, SchemaMismatchError
from dataflow.train.eagle3 import Eagle3Config, Eagle3Objective, build_vocab_map
from dataflow.train.export import export_draft, load_draft, load_exported

# H=32, 4 heads x 8, 2 kv heads x 8, intermediate 48, vocab 97, draft vocab 31.
EXPECTED = {
    "fc.weight": (32, 96),
    "midlayer.input_layernorm.weight": (32,),
    "midlayer.hidden_norm.weight": (32,),
    "midlayer.self_attn.q_proj.weight": (32, 64),
    "midlayer.self_attn.k_proj.weight": (16, 64),
    "midlayer.self_attn.v_proj.weight": (16, 64),
    "midlayer.self_attn.o_proj.weight": (32, 32),
    "midlayer.post_attention_layernorm.weight": (32,),
    "midlayer.mlp.gate_proj.weight": (48, 32),
    "midlayer.mlp.up_proj.weight": (48, 32),
    "midlayer.mlp.down_proj.weight": (32, 48),
    "norm.weight": (32,),
    "lm_head.weight": (31, 32),
    "d2t": (31,),
    "t2d": (97,),
}


@pytest.fixture
def trained() -> Eagle3Objective:
    cfg = Eagle3Config(
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=97,
        draft_vocab_size=31,
        target_layers=(1, 11, 20),
        num_target_layers=24,
        ttt_length=2,
    )
    objective = Eagle3Objective(cfg, seed=21)
    objective.set_vocab_map(*build_vocab_map(list(range(40, 97)) * 2, 97, 31))
    with torch.no_grad():  # make every tensor differ from a fresh init
        for p in objective.draft.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return objective


def tensor_names_and_shapes(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118


def test_sglang_directory_has_the_loader_names_shapes_and_config_fields(tmp_path, trained):
    out = export_draft(trained, tmp_path / "draft", fmt="sglang")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert tensor_names_and_shapes(out) == EXPECTED  # no embed_tokens: SGLang shares the target's
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["eagle_config"] == {
        "use_aux_hidden_state": True,
        "eagle_aux_hidden_state_layer_ids": [1, 11, 20],
    }
    assert config["draft_vocab_size"] == 31 and config["vocab_size"] == 97
    assert config["tie_word_embeddings"] is False
    assert config["num_hidden_layers"] == 1
    assert config["torch_dtype"] == "bfloat16"
    for field, value in {
        "hidden_size": 32,
        "target_hidden_size": 32,
        "intermediate_size": 48,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "hidden_act": "silu",
        "model_type": "llama",
    }.items():
        assert config[field] == value, field
    _, tensors = load_exported(out)
    assert tensors["fc.weight"].dtype == torch.bfloat16
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert torch.equal(tensors["d2t"], trained.draft.d2t)
    assert torch.equal(tensors["t2d"], trained.draft.t2d)
    assert torch.equal(tensors["lm_head.weight"], trained.draft.lm_head.weight.to(torch.bfloat16))


def test_fp32_export_round_trips_bit_exactly_into_a_fresh_model(tmp_path, trained):
    out = export_draft(trained, tmp_path / "draft", fmt="sglang", dtype=torch.float32)
    fresh = load_draft(out)
    original = trained.draft.state_dict()
    loaded = fresh.state_dict()
    assert set(loaded) == set(original)
    for name, value in original.items():
        assert loaded[name].dtype == value.dtype, name
        assert torch.equal(loaded[name], value), name
    assert fresh.config == trained.config


def test_hf_directory_also_carries_the_target_embedding(tmp_path, trained):
    out = export_draft(trained, tmp_path / "hf", fmt="hf", dtype=torch.float32)
    assert tensor_names_and_shapes(out) == {**EXPECTED, "embed_tokens.weight": (97, 32)}
    _, tensors = load_exported(out)
    assert torch.equal(tensors["embed_tokens.weight"], trained.target_embedding.weight)
    assert json.loads((out / "config.json").read_text())["dataflow"]["format"] == "hf"


def test_export_refuses_a_non_empty_target_and_bad_arguments(tmp_path, trained):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="exists and is not an empty directory"):
        export_draft(trained, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    with pytest.raises(InvalidInputError, match="export format must be one of"):
        export_draft(trained, tmp_path / "x", fmt="onnx")
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no staging left behind


def test_load_refuses_a_directory_with_foreign_tensor_names(tmp_path, trained):
    from safetensors.torch import load_file, save_file

    out = export_draft(trained, tmp_path / "draft", dtype=torch.float32)
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.midlayer.mlp.up_proj.weight"] = tensors.pop("midlayer.mlp.up_proj.weight")
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(SchemaMismatchError, match="missing \\['midlayer.mlp.up_proj.weight'\\]"):
        load_exported(out)


def test_every_parameter_of_sglangs_module_tree_is_filled_by_the_export(tmp_path, trained):
    """Replay the name mapping of SGLang's EAGLE3 ``load_weights`` (as read from its source):
    q/k/v fill the stacked ``qkv_proj``, gate/up fill ``gate_up_proj``, bare names get the
    ``model.`` prefix unless they exist at top level (``lm_head``), ``d2t`` becomes hot token
    ids and ``t2d`` is skipped. Every parameter of that module tree must be filled exactly."""
    out = export_draft(trained, tmp_path / "draft", dtype=torch.float32)
    _, tensors = load_exported(out)
    q, kv, inter = 32, 16, 48
    sglang_params = {  # name -> rows; embed_tokens comes from the target at runtime
        "model.fc.weight": 32,
        "model.midlayer.self_attn.qkv_proj.weight": q + 2 * kv,
        "model.midlayer.self_attn.o_proj.weight": 32,
        "model.midlayer.mlp.gate_up_proj.weight": 2 * inter,
        "model.midlayer.mlp.down_proj.weight": 32,
        "model.midlayer.input_layernorm.weight": 32,
        "model.midlayer.hidden_norm.weight": 32,
        "model.midlayer.post_attention_layernorm.weight": 32,
        "model.norm.weight": 32,
        "lm_head.weight": 31,
    }
    stacked = {
        ".q_proj": ".qkv_proj",
        ".k_proj": ".qkv_proj",
        ".v_proj": ".qkv_proj",
        ".gate_proj": ".gate_up_proj",
        ".up_proj": ".gate_up_proj",
    }
    filled: dict[str, int] = {}
    hot_token_ids = None
    for name, value in tensors.items():
        if "d2t" in name:
            hot_token_ids = value + torch.arange(value.shape[0])
            continue
        if "t2d" in name:
            continue
        for shard, param in stacked.items():
            if shard in name:
                name = name.replace(shard, param)
                break
        target = name if name in sglang_params else f"model.{name}"
        assert target in sglang_params, f"{name} would be silently dropped by the loader"
        filled[target] = filled.get(target, 0) + value.shape[0]
    assert filled == sglang_params
    assert hot_token_ids is not None
    assert torch.equal(hot_token_ids, trained.draft.t2d.nonzero().flatten())
