"""dataflow.train — see this package's README for what it owns."""

from dataflow.train.version import __version__

__all__ = ["__version__"]
