"""Capture and restore every random-number generator a training step may draw from.

The state is JSON-compatible (byte states as base64), so it lives in a checkpoint's per-rank
JSON file rather than in a pickle.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch


def _encode(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng() -> dict[str, Any]:
    """Return this process's torch (CPU and current CUDA device), Python and NumPy RNG states."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    assert isinstance(keys, np.ndarray)
    state: dict[str, Any] = {
        "torch": _encode(torch.get_rng_state()),
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = _encode(torch.cuda.get_rng_state())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`: the next draws equal those after the capture."""
    torch.set_rng_state(_decode(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_decode(state["cuda"]))


def seed_rng(seed: int, step: int, rank: int) -> None:
    """Seed every generator from ``(seed, step, rank)``: the state a rank takes when its saved
    generators do not exist (a resume on another number of ranks). Same inputs, same draws.
    """
    derived = (seed * 1_000_003 + step * 10_007 + rank) % (2**32)
    torch.manual_seed(derived)
    random.seed(derived)
    np.random.seed(derived)
