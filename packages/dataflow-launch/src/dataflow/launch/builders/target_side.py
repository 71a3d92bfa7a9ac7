"""What the trainer needs from the target without running it: shape, frozen head, tokenizer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from dataflow.launch.config import LaunchConfig
from dataflow.launch.engines import resolve_aux_layer_ids


@dataclass(frozen=True)
class TargetSide:
    """The target as the draft sees it.

    ``model_config`` is the target's HF-style config (dict), ``embed_weight``/``lm_head_weight``
    its frozen ``[vocab, hidden]`` embedding and head (CPU), ``aux_layer_ids`` the captured
    layers, ``tokenizer`` the target's tokenizer (renders the prompt set).
    """

    model_config: Mapping[str, Any]
    embed_weight: torch.Tensor = field(repr=False)
    lm_head_weight: torch.Tensor = field(repr=False)
    aux_layer_ids: tuple[int, int, int]
    tokenizer: Any = field(repr=False)

    @property
    def vocab_size(self) -> int:
        return int(self.model_config["vocab_size"])


def load_target_side(config: LaunchConfig) -> TargetSide:
    """The target side of ``config.target``: the built-in target is rebuilt from its seed (the
    same weights the producer runs); a model directory is read tensor by tensor (never fully
    loaded). A missing or incomplete model directory raises ``InvalidInputError``.
    """
    target = config.target
    if target.model_dir is None:
        from dataflow.launch.builtin.target import build_builtin_target

        assert target.builtin is not None
        model, tokenizer = build_builtin_target(target.builtin, torch.float32)
        model_config = model.config.to_dict()
        embed = model.get_input_embeddings().weight.detach().clone()
        head = model.get_output_embeddings().weight.detach().clone()
        del model
    else:
        from transformers import AutoTokenizer

        from dataflow.launch.engines.target_files import read_head_weights, read_model_config

        model_config = read_model_config(target.model_dir)
        embed, head = read_head_weights(target.model_dir)
        tokenizer = AutoTokenizer.from_pretrained(target.model_dir, local_files_only=True)
    layers = resolve_aux_layer_ids(int(model_config["num_hidden_layers"]), target.aux_layer_ids)
    return TargetSide(model_config, embed.float(), head.float(), layers, tokenizer)
