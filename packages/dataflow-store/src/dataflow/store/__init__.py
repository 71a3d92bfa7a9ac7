"""dataflow.store: the data plane. See this package's README for what it owns.

``open_store(uri, **options)`` builds a backend; every backend implements the contracts'
``FeatureStore`` protocol through :class:`BookkeepingStore`.
"""

from dataflow.store.base import BookkeepingStore, Generation, StoreOptions
from dataflow.store.factory import BACKENDS, open_store
from dataflow.store.faults import FaultInjector
from dataflow.store.version import __version__

__all__ = [
    "BACKENDS",
    "BookkeepingStore",
    "FaultInjector",
    "Generation",
    "StoreOptions",
    "open_store",
    "__version__",
]
