"""Which target layers EAGLE3 captures."""

from __future__ import annotations

from collections.abc import Sequence

from dataflow.contracts import InvalidInputError


def default_aux_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """The EAGLE3 rule ``[1, N//2 - 1, N - 4]`` for an ``N``-layer target.

    Layer ``k`` means the output of decoder layer ``k`` (0-based), i.e. HF's
    ``hidden_states[k + 1]``. Refused when the three ids are not distinct (N < 7).
    """
    ids = (1, num_layers // 2 - 1, num_layers - 4)
    return check_aux_layer_ids(ids, num_layers, "the default rule [1, N//2-1, N-4]")


def check_aux_layer_ids(
    ids: Sequence[int], num_layers: int, source: str = "aux_layer_ids"
) -> tuple[int, int, int]:
    """``ids`` as a triple, if they are three distinct layers of an ``num_layers``-layer target."""
    triple = tuple(int(i) for i in ids)
    if len(triple) != 3 or len(set(triple)) != 3 or any(not 0 <= i < num_layers for i in triple):
        raise InvalidInputError(
            f"{source} gives layers {list(triple)} for a {num_layers}-layer target; EAGLE3 needs "
            f"three distinct layers in [0, {num_layers}) (set target.aux_layer_ids, or use a "
            "target with at least 7 layers)"
        )
    return triple[0], triple[1], triple[2]


def resolve_aux_layer_ids(num_layers: int, override: Sequence[int] | None) -> tuple[int, int, int]:
    """The configured override if any, else the default rule."""
    if override is not None:
        return check_aux_layer_ids(override, num_layers)
    return default_aux_layer_ids(num_layers)
