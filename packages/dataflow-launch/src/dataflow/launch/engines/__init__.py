"""Target engines: one protocol, an in-process transformers engine and an SGLang client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dataflow.contracts import InvalidInputError
from dataflow.launch.config import TargetSection
from dataflow.launch.engines.base import (
    FEATURE_NAMES,
    CapturedSample,
    Regeneration,
    TargetEngine,
    TargetHead,
    TargetInfo,
)
from dataflow.launch.engines.features import check_features, eagle3_feature_specs
from dataflow.launch.engines.layers import default_aux_layer_ids, resolve_aux_layer_ids


def open_engine(
    target: TargetSection,
    *,
    regeneration: Regeneration | None = None,
    store_uri: str | None = None,
    store_options: dict[str, Any] | None = None,
) -> TargetEngine:
    """The engine ``target.engine`` names, built from ``target``.

    ``regeneration`` (``producer.regenerate``): the target writes each response itself and the
    features cover prompt + response; an engine that cannot generate refuses it with
    ``InvalidInputError`` naming ``producer.regenerate``.
    """
    if target.engine == "vllm":
        from dataflow.launch.engines.vllm import open_vllm_engine

        return open_vllm_engine(
            target, regeneration=regeneration, store_uri=store_uri, store_options=store_options
        )
    if target.engine == "sglang":
        if regeneration is not None:
            raise InvalidInputError(
                "producer.regenerate: the sglang engine cannot generate responses (it only "
                "captures the data's); use target.engine hf or set producer.regenerate false"
            )
        from dataflow.launch.engines.sglang import open_sglang_engine

        return open_sglang_engine(target)
    from dataflow.launch.engines.hf import open_hf_engine

    return open_hf_engine(target, regeneration=regeneration)


def expected_version(target: TargetSection) -> str:
    """The version ``open_engine(target).info.version`` reports, without opening the engine:
    ``target.version`` when set, else the built-in target's config digest or the model
    directory's name (the target's identity, as each engine states it).
    """
    if target.version:
        return target.version
    if target.model_dir is not None:
        if target.engine in ("sglang", "vllm"):
            from dataflow.launch.engines.served import model_dir_version

            return model_dir_version(target.model_dir)
        return Path(target.model_dir).resolve().name
    from dataflow.launch.builtin.target import builtin_version

    assert target.builtin is not None  # the config guarantees one of the two
    return builtin_version(target.builtin)


__all__ = [
    "FEATURE_NAMES",
    "CapturedSample",
    "Regeneration",
    "TargetEngine",
    "TargetHead",
    "TargetInfo",
    "check_features",
    "default_aux_layer_ids",
    "eagle3_feature_specs",
    "expected_version",
    "open_engine",
    "resolve_aux_layer_ids",
]
