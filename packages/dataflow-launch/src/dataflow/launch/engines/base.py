"""The target-engine contract: what every engine captures and what it tells the trainer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import torch

from dataflow.contracts import FeatureSpec, PromptTask

FEATURE_NAMES = ("input_ids", "loss_mask", "hidden_state", "aux_hidden_state")
"""The four EAGLE3 features of a captured sample, in this order."""


@dataclass(frozen=True)
class TargetInfo:
    """Tensor-free facts about the target that the trainer and the feature checks need.

    ``aux_layer_ids`` are decoder-layer indices (layer k = output of decoder layer k);
    ``dtype`` is the feature dtype of the hidden states (torch name without ``torch.``).
    """

    hidden_size: int
    vocab_size: int
    num_layers: int
    aux_layer_ids: tuple[int, int, int]
    dtype: str
    version: str
    pad_token_id: int = 0


@dataclass(frozen=True)
class TargetHead:
    """What the trainer takes from the target: the frozen token embedding and LM head (both
    ``[vocab_size, hidden_size]``, on CPU, detached) and the target's model config as plain
    JSON data (HF ``config.json`` keys: ``hidden_size``, ``num_attention_heads``, …), read-only.
    """

    info: TargetInfo
    embed_weight: torch.Tensor
    lm_head_weight: torch.Tensor
    model_config: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_config", MappingProxyType(dict(self.model_config)))


@dataclass(frozen=True)
class ServerWritten:
    """Features a capture server already wrote into the run's ``mooncake://`` store, headerless,
    at the store's keys for ``generation`` (``target.capture: mooncake``); ``specs`` are the four
    feature specs, checked against the engine's. The producer commits them without a put
    (``MooncakeFeatureStore.adopt_external``).
    """

    generation: int
    specs: Mapping[str, FeatureSpec] = field(hash=False)
    layout: str = "raw"
    """``raw``: SpecForge's headerless Mooncake objects (``adopt_external``); ``staged``: a
    sample staged by the vLLM connector's store mode (``store.adopt``, any staging store)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "specs", MappingProxyType(dict(self.specs)))


@dataclass(frozen=True)
class CapturedSample:
    """One prompt's features, checked against the engine's feature specs.

    ``tensors`` holds :data:`FEATURE_NAMES`: ``input_ids`` int64 ``[1,T]``, ``loss_mask`` int64
    ``[1,T]``, ``hidden_state`` ``[1,T,H]`` (last post-norm hidden state) and
    ``aux_hidden_state`` ``[1,T,3H]`` (the three captured layers, concatenated in order) — or,
    when ``written`` is set, nothing: the features are already in the store (see
    :class:`ServerWritten`).
    """

    task_id: str
    tensors: Mapping[str, torch.Tensor] = field(hash=False)
    written: ServerWritten | None = None
    values_checked: bool = False
    """True when :func:`~dataflow.launch.engines.features.checked_sample` passed ``tensors``'
    values (finite hidden states, a 0/1 loss mask, at least one token): the producer then checks
    only what depends on its run (``max_length``) instead of reading every value again."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    @property
    def num_tokens(self) -> int:
        """T, the sample's token count."""
        if self.written is not None:
            return int(self.written.specs["input_ids"].shape[-1])
        return int(self.tensors["input_ids"].shape[-1])

    @property
    def nbytes(self) -> int:
        """Raw bytes of all four features."""
        if self.written is not None:
            return sum(spec.nbytes for spec in self.written.specs.values())
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class Regeneration:
    """The target writes the assistant turn itself (``producer.regenerate``).

    A task's payload then holds the prompt only (ending where the assistant's turn starts); the
    engine appends up to ``max_new_tokens`` tokens of its own (greedy when ``temperature`` is 0,
    sampled with ``seed`` otherwise) and captures features over prompt + response in the same
    pass or request. The loss mask covers the generated tokens only.
    """

    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0


@runtime_checkable
class TargetEngine(Protocol):
    """Runs the target over prompt tasks and captures EAGLE3 features.

    - ``capture(tasks)`` returns one :class:`CapturedSample` per task, in task order, each
      already checked against ``feature_specs(T)``; it raises ``InvalidInputError`` when a task's
      payload is unusable (naming the task), ``SchemaMismatchError`` when the target produced
      features of the wrong shape or dtype, and ``BackendUnavailableError`` when a remote target
      cannot be reached. Captured tensors live on the CPU.
    - ``feature_specs(T)`` gives the four specs of a T-token sample.
    - ``target_head()`` gives the embedding and LM-head weights the trainer freezes.
    """

    @property
    def info(self) -> TargetInfo: ...

    def capture(self, tasks: Sequence[PromptTask]) -> list[CapturedSample]: ...

    def feature_specs(self, num_tokens: int) -> dict[str, FeatureSpec]: ...

    def target_head(self) -> TargetHead: ...

    def close(self) -> None: ...
