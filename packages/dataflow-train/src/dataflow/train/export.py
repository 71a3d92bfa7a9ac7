"""Export a trained EAGLE3 draft: an SGLang-loadable directory and a self-contained HF directory.

Both are ``config.json`` + ``model.safetensors``. The SGLang form holds exactly the tensors
SGLang's ``LlamaForCausalLMEagle3.load_weights`` consumes (:data:`SGLANG_TENSOR_NAMES`; the token
embedding is omitted because the server shares the target's); the HF form adds
``embed_tokens.weight`` (the frozen target embedding) so the directory stands alone.
``config.json`` carries the fields SGLang's EAGLE3 path reads: ``architectures``,
``draft_vocab_size``, ``tie_word_embeddings: false``, ``target_hidden_size`` and
``eagle_config.eagle_aux_hidden_state_layer_ids`` (the captured layers, in the convention of the
engine the format targets: :data:`ENGINE_LAYER_OFFSET`), plus the usual Llama fields. The
``vllm`` form is the SGLang form with the layer ids vLLM reads (trained id + 1); it loads with
vLLM's ``eagle3`` method as written. The package README records the source checked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dataflow.contracts.errors import InvalidInputError, SchemaMismatchError
from dataflow.train.eagle3 import Eagle3Config, Eagle3DraftModel, Eagle3Objective

SGLANG_ARCHITECTURE = "LlamaForCausalLMEagle3"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EMBEDDING_NAME = "embed_tokens.weight"
FORMATS = ("sglang", "vllm", "hf")

ENGINE_LAYER_OFFSET = {"sglang": 0, "hf": 0, "vllm": 1}
"""What each format adds to a trained layer id ("output of decoder layer k") in
``eagle_aux_hidden_state_layer_ids``: SGLang adds 1 to explicit ids itself
(``set_eagle3_layers_to_capture``), vLLM uses them as given as "residual stream after k decoder
layers" (``_maybe_add_hidden_state``), so its ids are ours + 1."""

SGLANG_TENSOR_NAMES = (
    "fc.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
    "t2d",
)

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def expected_tensor_shapes(config: Eagle3Config) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor of the SGLang form, by name, for ``config``."""
    h, inter = config.hidden_size, config.intermediate_size
    q, kv = (
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
    )
    return {
        "fc.weight": (h, 3 * h),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.self_attn.q_proj.weight": (q, 2 * h),
        "midlayer.self_attn.k_proj.weight": (kv, 2 * h),
        "midlayer.self_attn.v_proj.weight": (kv, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, q),
        "midlayer.post_attention_layernorm.weight": (h,),
        "midlayer.mlp.gate_proj.weight": (inter, h),
        "midlayer.mlp.up_proj.weight": (inter, h),
        "midlayer.mlp.down_proj.weight": (h, inter),
        "norm.weight": (h,),
        "lm_head.weight": (config.draft_vocab_size, h),
        "d2t": (config.draft_vocab_size,),
        "t2d": (config.vocab_size,),
    }


def engine_layer_ids(trained: tuple[int, ...] | list[int], fmt: str) -> list[int]:
    """The ids to write for ``fmt`` so that the engine captures exactly the ``trained`` layers."""
    return [int(k) + ENGINE_LAYER_OFFSET[fmt] for k in trained]


def draft_config_json(config: Eagle3Config, dtype: torch.dtype, fmt: str) -> dict[str, Any]:
    """The ``config.json`` of an exported draft (see the module docstring for the fields)."""
    return {
        "architectures": [SGLANG_ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.hidden_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "eagle_config": {
            "use_aux_hidden_state": True,
            "eagle_aux_hidden_state_layer_ids": engine_layer_ids(config.target_layers, fmt),
        },
        "dataflow": {
            "format": fmt,
            "ttt_length": config.ttt_length,
            "ttt_decay": config.ttt_decay,
            "num_target_layers": config.num_target_layers,
        },
    }


def _draft_tensors(draft: Eagle3DraftModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = draft.state_dict()
    if set(state) != set(SGLANG_TENSOR_NAMES):
        raise SchemaMismatchError(
            f"draft state has tensors {sorted(state)}, expected {sorted(SGLANG_TENSOR_NAMES)}"
        )
    out = {}
    for name in SGLANG_TENSOR_NAMES:
        value = state[name].detach().cpu()
        out[name] = value.to(dtype) if value.is_floating_point() else value
        out[name] = out[name].contiguous()
    return out


def export_draft(
    objective: Eagle3Objective,
    out_dir: str | os.PathLike[str],
    *,
    fmt: str = "sglang",
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write the draft of ``objective`` to ``out_dir`` in format ``fmt`` (``sglang`` or ``hf``).

    ``objective`` must hold full (unsharded) tensors: export from an objective rebuilt from a
    checkpoint, not from an FSDP-sharded one. Guarantees: the directory appears complete or not
    at all (written beside it, then renamed);
    an existing non-empty ``out_dir`` is refused; floating tensors are cast to ``dtype``, ``d2t``
    (int64) and ``t2d`` (bool) are kept exact. Returns the directory.
    """
    if fmt not in FORMATS:
        raise InvalidInputError(f"export format must be one of {FORMATS}, got {fmt!r}")
    if dtype not in _DTYPE_NAMES:
        raise InvalidInputError(f"export dtype must be one of {list(_DTYPE_NAMES)}, got {dtype}")
    target = Path(out_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InvalidInputError(
            f"export target {str(target)!r} exists and is not an empty directory"
        )
    tensors = _draft_tensors(objective.draft, dtype)
    if fmt == "hf":
        tensors[EMBEDDING_NAME] = objective.target_embedding.weight.detach().cpu().to(dtype)
    config = draft_config_json(objective.config, dtype, fmt)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _trained_layers(ids: list[Any], offset: int) -> tuple[int, int, int]:
    """The three target layers the draft was trained on, from an export's engine ids."""
    layers = [int(k) - offset for k in ids]
    if len(layers) != 3:
        raise SchemaMismatchError(
            f"eagle_aux_hidden_state_layer_ids {ids!r}: an EAGLE3 draft reads exactly 3 layers"
        )
    return layers[0], layers[1], layers[2]


def config_from_json(data: dict[str, Any]) -> Eagle3Config:
    """Rebuild :class:`Eagle3Config` from an exported ``config.json``; refuses other drafts."""
    if data.get("architectures") != [SGLANG_ARCHITECTURE]:
        raise SchemaMismatchError(
            f"config.json architectures is {data.get('architectures')!r}, "
            f"expected [{SGLANG_ARCHITECTURE!r}]"
        )
    extra = data.get("dataflow") or {}
    try:
        return Eagle3Config(
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            num_attention_heads=data["num_attention_heads"],
            num_key_value_heads=data["num_key_value_heads"],
            head_dim=data["head_dim"],
            vocab_size=data["vocab_size"],
            draft_vocab_size=data["draft_vocab_size"],
            target_layers=_trained_layers(
                data["eagle_config"]["eagle_aux_hidden_state_layer_ids"],
                ENGINE_LAYER_OFFSET.get(extra.get("format", "sglang"), 0),
            ),
            rms_norm_eps=data["rms_norm_eps"],
            rope_theta=data["rope_theta"],
            max_position_embeddings=data["max_position_embeddings"],
            ttt_length=extra.get("ttt_length", 7),
            ttt_decay=extra.get("ttt_decay", 0.8),
            num_target_layers=extra.get("num_target_layers", 0),
            hidden_act=data.get("hidden_act", "silu"),
            pad_token_id=data.get("pad_token_id"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SchemaMismatchError(f"config.json lacks or mistypes field {exc}") from exc


def load_exported(
    path: str | os.PathLike[str],
) -> tuple[Eagle3Config, dict[str, torch.Tensor]]:
    """Read an exported directory: its config and tensors, checked name by name and by shape."""
    root = Path(path)
    config = config_from_json(json.loads((root / CONFIG_FILE).read_text()))
    tensors = load_file(str(root / WEIGHTS_FILE))
    shapes = expected_tensor_shapes(config)
    extra = set(tensors) - set(shapes) - {EMBEDDING_NAME}
    missing = set(shapes) - set(tensors)
    if extra or missing:
        raise SchemaMismatchError(
            f"exported tensors disagree with the EAGLE3 layout: missing {sorted(missing)}, "
            f"unexpected {sorted(extra)}"
        )
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise SchemaMismatchError(
                f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}"
            )
    return config, tensors


def load_draft(path: str | os.PathLike[str]) -> Eagle3DraftModel:
    """A fresh :class:`Eagle3DraftModel` holding the exported weights (in the exported dtype)."""
    config, tensors = load_exported(path)
    draft = Eagle3DraftModel(config)
    dtype = tensors["fc.weight"].dtype
    draft.to(dtype)
    draft.load_state_dict({name: tensors[name] for name in SGLANG_TENSOR_NAMES}, strict=True)
    return draft
