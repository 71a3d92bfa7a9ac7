"""Target engines: one protocol, an in-process transformers engine and an SGLang client."""

from __future__ import annotations

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
    """The engine ``target.engine`` names, built from ``target`` (``regeneration``: the target
    writes the assistant turns itself, see :class:`Regeneration`).
    """
    if target.engine == "vllm":
        from dataflow.launch.engines.vllm import open_vllm_engine

        return open_vllm_engine(target, regeneration=regeneration)
    if target.engine == "sglang":
        from dataflow.launch.engines.sglang import open_sglang_engine

        return open_sglang_engine(target)
    from dataflow.launch.engines.hf import open_hf_engine

    return open_hf_engine(target)


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
