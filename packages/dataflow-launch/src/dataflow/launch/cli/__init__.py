"""The ``dataflow-launch`` command line: ``main`` dispatches to one module per command."""

from dataflow.launch.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
