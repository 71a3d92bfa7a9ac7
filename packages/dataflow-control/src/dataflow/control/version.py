"""The single source of this distribution's version (read by hatchling)."""

__version__ = "0.1.0"
