"""``assert_no_tensors``: keep tensors out of the control plane without importing torch.

Control-plane records travel through databases, JSON and other processes; a tensor inside one is
a bug (it would be pickled, copied or silently truncated). The guard is duck-typed so it can run
where neither torch nor numpy is installed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

_PRIMITIVES = (str, bytes, bool, int, float, type(None))
_TENSOR_ROOT_MODULES = frozenset({"torch", "numpy", "jax", "jaxlib", "cupy", "tensorflow"})


def looks_like_tensor(value: Any) -> bool:
    """True for array-like values: a type from an array library, or anything with dtype+shape+device.

    Plain Python numbers (including numpy scalars that subclass ``float``) are not tensors.
    """
    if isinstance(value, _PRIMITIVES):
        return False
    module = type(value).__module__ or ""
    if module.split(".", 1)[0] in _TENSOR_ROOT_MODULES:
        return True
    return all(hasattr(value, attr) for attr in ("dtype", "shape", "device"))


def _describe(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def assert_no_tensors(value: Any, root: str = "value") -> None:
    """Raise ``TypeError`` if a tensor-like value hides anywhere inside ``value``.

    Walks dataclass instances (field by field), mappings (keys and values), lists, tuples, sets and
    frozensets. The error names the path of the first offender, e.g. ``ref.metadata['x'][2]``, and
    its type. Anything else (strings, numbers, opaque objects) passes. Cycles are not followed twice.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(value, root)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, _PRIMITIVES):
            continue
        if looks_like_tensor(item):
            raise TypeError(
                f"tensor-like value at {path}: {_describe(item)}; control-plane records "
                "carry metadata only (put tensors in a feature store)"
            )
        if id(item) in seen:
            continue
        seen.add(id(item))
        children: list[tuple[Any, str]] = []
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            for f in dataclasses.fields(item):
                children.append((getattr(item, f.name), f"{path}.{f.name}"))
        elif isinstance(item, Mapping):
            for key, child in item.items():
                children.append((key, f"{path}.keys()[{key!r}]"))
                children.append((child, f"{path}[{key!r}]"))
        elif isinstance(item, (list, tuple)):
            children.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
        elif isinstance(item, (set, frozenset)):
            children.extend((child, f"{path}{{{i}}}") for i, child in enumerate(item))
        # Depth-first in declaration order, so the *first* offender is the one reported.
        for child, child_path in reversed(children):
            if not isinstance(child, _PRIMITIVES):
                stack.append((child, child_path))
