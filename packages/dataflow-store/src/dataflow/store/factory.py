"""``open_store(uri, **options)``: one entry point that builds any backend from its URI.

Backend hook (how a backend plugs in): the URI scheme names a module and a class, imported only
when that scheme is opened, so ``mooncake`` stays an optional extra::

    memory   -> dataflow.store.memory.MemoryFeatureStore
    file     -> dataflow.store.file.FileFeatureStore
    shm      -> dataflow.store.shm.ShmFeatureStore
    dir      -> dataflow.store.shared_dir.SharedDirFeatureStore
    mooncake -> dataflow.store.mooncake.MooncakeFeatureStore

The class is called as ``cls(parsed, **options)`` where ``parsed`` is the
:class:`~dataflow.contracts.uris.ParsedURI` from :func:`~dataflow.contracts.uris.parse_store_uri` and
``options`` are exactly the keyword arguments given to ``open_store``. Every backend accepts the
common options of :class:`~dataflow.store.base.BookkeepingStore` (``budget_bytes``,
``max_age_s``, ``retain_on_release``, ``clock``, ``faults``) plus its own (documented on its
class). Query-string options in the URI (``parsed.options``) are the backend's to interpret.
"""

from __future__ import annotations

import importlib
from typing import Any

from dataflow.contracts import FeatureStore, InvalidInputError
from dataflow.contracts.uris import parse_store_uri

BACKENDS: dict[str, tuple[str, str]] = {
    "memory": ("dataflow.store.memory", "MemoryFeatureStore"),
    "file": ("dataflow.store.file", "FileFeatureStore"),
    "shm": ("dataflow.store.shm", "ShmFeatureStore"),
    "dir": ("dataflow.store.shared_dir", "SharedDirFeatureStore"),
    "mooncake": ("dataflow.store.mooncake", "MooncakeFeatureStore"),
}
"""URI scheme -> (module, class) of the backend serving it."""


def open_store(uri: str, **options: Any) -> FeatureStore:
    """Build the store ``uri`` names; raise ``InvalidInputError`` for a bad URI or option.

    Guarantees: the URI is validated before any backend module is imported; an unknown option
    is refused by name rather than silently ignored.
    """
    parsed = parse_store_uri(uri)
    module_name, class_name = BACKENDS[parsed.scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidInputError(
            f"store scheme {parsed.scheme!r} needs {module_name}, which cannot be imported "
            f"({exc}); install dataflow-store with the matching extra"
        ) from exc
    cls = getattr(module, class_name)
    try:
        store: FeatureStore = cls(parsed, **options)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise InvalidInputError(f"{uri!r}: {exc}") from None
        raise
    return store
