"""dataflow.store: the data plane. See this package's README for what it owns.

``open_store(uri, **options)`` builds a backend; every backend implements the contracts'
``FeatureStore`` protocol through :class:`BookkeepingStore`.
"""

from dataflow.store.base import BookkeepingStore, StoreOptions
from dataflow.store.factory import open_store
from dataflow.store.faults import FaultInjector
from dataflow.store.version import __version__

__all__ = [
    "BookkeepingStore",
    "FaultInjector",
    "StoreOptions",
    "open_store",
    "__version__",
]
