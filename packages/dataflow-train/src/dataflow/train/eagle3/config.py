"""Eagle3Config: the shape of an EAGLE3 draft and of the training objective around it.

The captured-layer rule follows SGLang's convention: layer id ``k`` is the residual-stream hidden
state *after* decoder layer ``k`` (0-indexed), i.e. HF ``hidden_states[k + 1]``; the default for an
``N``-layer target is ``[1, N // 2 - 1, N - 4]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dataflow.contracts.checks import is_int
from dataflow.contracts.errors import InvalidInputError


def default_target_layers(num_target_layers: int) -> tuple[int, int, int]:
    """The three captured layer ids for an ``N``-layer target: ``(1, N // 2 - 1, N - 4)``.

    Guarantees three distinct ids in ``[0, N)``; targets with fewer than 6 layers cannot satisfy
    that and are refused with :class:`InvalidInputError`.
    """
    n = num_target_layers
    if not is_int(n) or n < 6:
        raise InvalidInputError(
            f"the default captured layers [1, N//2-1, N-4] need a target with at least 6 "
            f"layers (three distinct ids); got num_hidden_layers={n!r}"
        )
    return (1, n // 2 - 1, n - 4)


def _check_positive(name: str, value: object) -> None:
    if not is_int(value) or value <= 0:
        raise InvalidInputError(f"Eagle3Config.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class Eagle3Config:
    """Everything that fixes the draft's tensors and the TTT objective.

    ``hidden_size`` is the target's hidden size (the draft works at the same width, ``fc`` maps
    ``3 * hidden_size -> hidden_size``); ``vocab_size`` is the target vocabulary,
    ``draft_vocab_size`` the reduced draft vocabulary. ``target_layers`` are the captured layer
    ids (SGLang convention, see module docstring); ``num_target_layers`` the target's depth when
    known (0 = unknown). Construction validates every field and raises
    :class:`InvalidInputError` naming the field.
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    draft_vocab_size: int
    target_layers: tuple[int, int, int]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    ttt_length: int = 7
    ttt_decay: float = 0.8
    num_target_layers: int = 0
    hidden_act: str = "silu"
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "draft_vocab_size",
            "max_position_embeddings",
            "ttt_length",
        ):
            _check_positive(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise InvalidInputError(
                f"Eagle3Config.num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise InvalidInputError(
                f"Eagle3Config.head_dim must be even (RoPE), got {self.head_dim}"
            )
        if self.draft_vocab_size > self.vocab_size:
            raise InvalidInputError(
                f"Eagle3Config.draft_vocab_size ({self.draft_vocab_size}) exceeds the target "
                f"vocab_size ({self.vocab_size})"
            )
        layers = tuple(self.target_layers)
        if len(layers) != 3 or len(set(layers)) != 3 or any(not is_int(x) or x < 0 for x in layers):
            raise InvalidInputError(
                f"Eagle3Config.target_layers must be three distinct non-negative ints, "
                f"got {self.target_layers!r}"
            )
        if self.num_target_layers and max(layers) >= self.num_target_layers:
            raise InvalidInputError(
                f"Eagle3Config.target_layers {list(layers)} must be < num_target_layers "
                f"({self.num_target_layers})"
            )
        object.__setattr__(self, "target_layers", layers)
        if not (0.0 < self.ttt_decay <= 1.0):
            raise InvalidInputError(
                f"Eagle3Config.ttt_decay must be in (0, 1], got {self.ttt_decay}"
            )
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise InvalidInputError("Eagle3Config.rms_norm_eps and rope_theta must be positive")
        if self.hidden_act != "silu":
            raise InvalidInputError(
                f"Eagle3Config.hidden_act must be 'silu', got {self.hidden_act!r}"
            )

    @property
    def step_weights(self) -> tuple[float, ...]:
        """The TTT step weights ``ttt_decay ** k`` for ``k = 0 .. ttt_length - 1``."""
        return tuple(self.ttt_decay**k for k in range(self.ttt_length))

    @classmethod
    def from_target_config(
        cls,
        target: Mapping[str, Any] | Any,
        *,
        draft_vocab_size: int,
        target_layers: Sequence[int] | None = None,
        intermediate_size: int | None = None,
        ttt_length: int = 7,
        ttt_decay: float = 0.8,
    ) -> Eagle3Config:
        """Derive the draft config from a target's (HF-style) config, dict or object.

        Width, heads, head_dim, vocabulary, RoPE and norm settings are the target's; the captured
        layers default to :func:`default_target_layers` of its ``num_hidden_layers``. A missing
        required field raises :class:`InvalidInputError` naming it.
        """

        def get(name: str, default: Any = None) -> Any:
            if isinstance(target, Mapping):
                return target.get(name, default)
            return getattr(target, name, default)

        missing = [
            name
            for name in ("hidden_size", "num_attention_heads", "vocab_size", "num_hidden_layers")
            if get(name) is None
        ]
        if missing:
            raise InvalidInputError(f"target config lacks required field(s): {', '.join(missing)}")
        hidden = int(get("hidden_size"))
        heads = int(get("num_attention_heads"))
        n_layers = int(get("num_hidden_layers"))
        layers = (
            tuple(target_layers) if target_layers is not None else default_target_layers(n_layers)
        )
        return cls(
            hidden_size=hidden,
            intermediate_size=int(intermediate_size or get("intermediate_size") or 4 * hidden),
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            vocab_size=int(get("vocab_size")),
            draft_vocab_size=draft_vocab_size,
            target_layers=layers,  # type: ignore[arg-type]
            rms_norm_eps=float(get("rms_norm_eps", 1e-6) or 1e-6),
            rope_theta=float(get("rope_theta", 10000.0) or 10000.0),
            max_position_embeddings=int(get("max_position_embeddings", 4096) or 4096),
            ttt_length=ttt_length,
            ttt_decay=ttt_decay,
            num_target_layers=n_layers,
            pad_token_id=get("pad_token_id"),
        )
