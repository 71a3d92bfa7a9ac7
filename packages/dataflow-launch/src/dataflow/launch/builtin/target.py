"""The built-in small target: the shipped trained LLaMA, or a LLaMA with seeded random weights.

``weights: trained`` (opt-in) loads ``assets/target.safetensors`` (made by
``python -m dataflow.launch.builtin.train_target``) after checking its sha256 against
``assets/target.json``; nothing is downloaded. ``weights: random`` (the default): the target is random but FIXED: every weight is drawn from ``torch.Generator(seed)`` in a fixed
order by this module (not by transformers' own initialiser), so the same seed gives bit-identical
weights on every machine and transformers version, and the global RNG is left untouched. Its
next-token choices are therefore a fixed function of the context; a draft trained on its features
learns to imitate that function and its acceptance rises. The LM head is drawn wider than the
other weights (std ``logit_std / sqrt(H)``) so the target's distribution is sharp enough for argmax agreement
to be a meaningful signal.
"""

from __future__ import annotations

import hashlib
import json
from importlib.resources import files
from typing import Any

import torch

from dataflow.contracts import CorruptRecordError, NotFoundError
from dataflow.launch.builtin.tokenizer import load_builtin_tokenizer
from dataflow.launch.config import BuiltinTargetSection
from dataflow.launch.extras import require

TRAINED_WEIGHTS = "target.safetensors"
TRAINED_META = "target.json"
_INIT_STD = 0.02
_MAX_POSITIONS = 8192


def builtin_version(section: BuiltinTargetSection) -> str:
    """A target version id that changes with any field of the built-in target's config (a random
    target's id leaves out ``weights``, so it is the id such a target had before that field).
    """
    fields = section.model_dump(mode="json")
    if fields["weights"] == "random":
        del fields["weights"]
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return f"builtin-{digest[:12]}"


def builtin_llama_config(section: BuiltinTargetSection, vocab_size: int) -> Any:
    """The ``LlamaConfig`` of the built-in target over a vocabulary of ``vocab_size`` ids."""
    return require("transformers").LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=section.hidden_size,
        intermediate_size=section.intermediate_size,
        num_hidden_layers=section.num_layers,
        num_attention_heads=section.num_heads,
        num_key_value_heads=section.num_kv_heads,
        max_position_embeddings=_MAX_POSITIONS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=_INIT_STD,
    )


@torch.no_grad()
def _seed_weights(model: torch.nn.Module, seed: int, head_std: float) -> None:
    # Sorted names make the draw order independent of module registration order.
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        std = head_std if name.startswith("lm_head") else _INIT_STD
        values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
        param.copy_(values.to(param.dtype))


def trained_weights(assets: Any = None) -> dict[str, torch.Tensor]:
    """The shipped trained target's tensors, after their sha256 matched ``target.json``
    (``assets``: the directory holding both; default the package's ``assets``).

    Raises :class:`NotFoundError` when the asset is missing and :class:`CorruptRecordError` when
    its checksum disagrees (a truncated or replaced file is never loaded).
    """
    from safetensors.torch import load

    if assets is None:
        assets = files("dataflow.launch").joinpath("assets")
    weights, meta = assets.joinpath(TRAINED_WEIGHTS), assets.joinpath(TRAINED_META)
    if not weights.is_file() or not meta.is_file():
        raise NotFoundError(
            f"the trained built-in target ({TRAINED_WEIGHTS}, {TRAINED_META}) is missing from "
            "the package assets; rerun python -m dataflow.launch.builtin.train_target"
        )
    body = weights.read_bytes()
    expected = json.loads(meta.read_text(encoding="utf-8"))["sha256"]
    actual = hashlib.sha256(body).hexdigest()
    if actual != expected:
        raise CorruptRecordError(
            f"{TRAINED_WEIGHTS} has sha256 {actual}, {TRAINED_META} says {expected}: "
            "the shipped target weights are damaged; reinstall dataflow-launch"
        )
    return dict(load(body))


def build_builtin_target(section: BuiltinTargetSection, dtype: torch.dtype) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the built-in target in eval mode over the shipped tokenizer,
    with the shipped trained weights (``weights: trained``) or weights fixed by
    ``section.seed`` (``weights: random``).
    """
    transformers = require("transformers")
    tokenizer = load_builtin_tokenizer()
    config = builtin_llama_config(section, len(tokenizer))
    with torch.random.fork_rng(devices=[]):  # transformers' own init draws from the global RNG
        model: Any = transformers.LlamaForCausalLM(config)
    if section.weights == "trained":
        tensors = trained_weights()
        model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    else:
        _seed_weights(model, section.seed, section.logit_std / section.hidden_size**0.5)
    return model.to(dtype).eval(), tokenizer
