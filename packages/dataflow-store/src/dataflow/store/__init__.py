"""dataflow.store — see this package's README for what it owns."""

from dataflow.store.version import __version__

__all__ = ["__version__"]
