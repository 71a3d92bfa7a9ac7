"""dataflow.control — see this package's README for what it owns."""

from dataflow.control.version import __version__

__all__ = ["__version__"]
