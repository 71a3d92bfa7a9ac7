"""dataflow.launch — see this package's README for what it owns."""

from dataflow.launch.version import __version__

__all__ = ["__version__"]
