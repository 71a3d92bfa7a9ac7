"""Target engines: one protocol, an in-process transformers engine and an SGLang client."""

from __future__ import annotations

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


def open_engine(target: TargetSection, *, regeneration: Regeneration | None = None) -> TargetEngine:
    """The engine ``target.engine`` names, built from ``target``.

    ``regeneration`` (``producer.regenerate``): the target writes each response itself and the
    features cover prompt + response; an engine that cannot generate refuses it with
    ``InvalidInputError`` naming ``producer.regenerate``.
    """
    if target.engine == "vllm":
        from dataflow.launch.engines.vllm import open_vllm_engine

        return open_vllm_engine(target, regeneration=regeneration)
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
    "open_engine",
    "resolve_aux_layer_ids",
]
