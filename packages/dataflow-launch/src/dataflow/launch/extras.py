"""Optional dependencies, imported on first use with a clear error when absent."""

from __future__ import annotations

import importlib
from types import ModuleType

from dataflow.contracts import BackendUnavailableError

_EXTRA = {"transformers": "hf", "requests": "sglang"}


def require(module: str) -> ModuleType:
    """Import ``module`` or raise :class:`BackendUnavailableError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = _EXTRA.get(module, module)
        raise BackendUnavailableError(
            f"this needs the {module!r} package: pip install 'dataflow-launch[{extra}]'"
        ) from None
