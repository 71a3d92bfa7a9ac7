"""What every engine over a serving process shares: the target is a model directory on disk."""

from __future__ import annotations

from typing import Any

from dataflow.contracts import FeatureSpec
from dataflow.launch.engines.base import TargetHead, TargetInfo
from dataflow.launch.engines.features import eagle3_feature_specs
from dataflow.launch.engines.layers import resolve_aux_layer_ids
from dataflow.launch.engines.target_files import read_head_weights, read_model_config
from dataflow.launch.extras import require


def model_dir_version(model_dir: str) -> str:
    """A served target's identity when ``target.version`` is unset: its directory's name."""
    return model_dir.rstrip("/").rsplit("/", 1)[-1]


def served_target_info(
    model_dir: str, aux_layer_ids: Any, dtype: str, version: str | None
) -> tuple[TargetInfo, dict[str, Any]]:
    """The :class:`TargetInfo` of the model a server runs from ``model_dir`` (read from its
    ``config.json``, aux layers by the layer rule), and that config.
    """
    config = read_model_config(model_dir)
    num_layers = int(config["num_hidden_layers"])
    info = TargetInfo(
        hidden_size=int(config["hidden_size"]),
        vocab_size=int(config["vocab_size"]),
        num_layers=num_layers,
        aux_layer_ids=resolve_aux_layer_ids(num_layers, aux_layer_ids),
        dtype=dtype,
        version=version or model_dir_version(model_dir),
        pad_token_id=int(config.get("pad_token_id") or 0),
    )
    return info, config


class ServedModelDirEngine:
    """The engine-contract parts of an engine whose target a server runs from ``_model_dir``:
    ``info``, the directory's tokenizer (loaded on first use, local files only), the EAGLE3
    feature specs, and the target head read from the directory's weights (never from the
    server). Subclasses set ``_info``, ``_model_dir`` and ``_tokenizer`` (None: load lazily).
    """

    _info: TargetInfo
    _model_dir: str
    _tokenizer: Any

    @property
    def info(self) -> TargetInfo:
        return self._info

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of the model directory (loaded on first use)."""
        if self._tokenizer is None:
            transformers = require("transformers")
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(
                self._model_dir, local_files_only=True
            )
        return self._tokenizer

    def feature_specs(self, num_tokens: int) -> dict[str, FeatureSpec]:
        return eagle3_feature_specs(self._info, num_tokens)

    def target_head(self) -> TargetHead:
        embed, head = read_head_weights(self._model_dir)
        return TargetHead(
            self._info,
            embed.detach().clone(),
            head.detach().clone(),
            model_config=read_model_config(self._model_dir),
        )
