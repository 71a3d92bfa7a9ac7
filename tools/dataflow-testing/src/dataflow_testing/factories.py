"""Record factories the packages' tests share: one way to make a ``SampleRef`` or ``PromptTask``.

``make_ref(i)`` is sample ``s00000i`` in ``memory://features`` with one ``hidden`` feature
(``[4, 8]`` bfloat16), generation 1, 100 estimated bytes and 4 tokens; every keyword changes
one of those or sets any other ``SampleRef`` field. Tests keep their own small wrappers for the
defaults they need, so their assertions read as before.
"""

from __future__ import annotations

from typing import Any

from dataflow.contracts import FeatureSpec, PromptTask, SampleRef


def sample_id(i: int, width: int = 5) -> str:
    """``s`` + ``i`` zero-padded to ``width`` digits (``width=0``: no padding)."""
    return f"s{str(i).zfill(width)}"


def make_ref(
    i: int,
    *,
    width: int = 5,
    store_uri: str = "memory://features",
    feature: str = "hidden",
    shape: tuple[int, ...] = (4, 8),
    dtype: str = "bfloat16",
    generation: int = 1,
    nbytes: int = 100,
    num_tokens: int = 4,
    **fields: Any,
) -> SampleRef:
    """Sample ``i``'s ref with one feature; ``fields`` are passed on to ``SampleRef``."""
    sid = sample_id(i, width)
    return SampleRef(
        sample_id=sid,
        store_uri=store_uri,
        feature_keys={feature: f"{sid}/{feature}"},
        feature_specs={feature: FeatureSpec(feature, shape, dtype)},
        generation=generation,
        estimated_bytes=nbytes,
        num_tokens=num_tokens,
        **fields,
    )


def make_refs(start: int, count: int, **kw: Any) -> list[SampleRef]:
    """``make_ref(i, **kw)`` for ``i`` in ``start .. start + count - 1``."""
    return [make_ref(i, **kw) for i in range(start, start + count)]


def make_task(i: int, **fields: Any) -> PromptTask:
    """Prompt task ``t0000i`` with a three-token payload; ``fields`` go to ``PromptTask``."""
    return PromptTask(task_id=f"t{i:05d}", payload={"input_ids": [1, 2, i]}, **fields)
