"""The ``dataflow-launch`` command line.

Only ``--help`` and ``--version`` exist until the launch package's topologies land.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dataflow.launch.version import __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dataflow-launch``."""
    parser = argparse.ArgumentParser(
        prog="dataflow-launch",
        description=(
            "Train EAGLE3 draft models online from a live target model. "
            "The run/demo/produce/consume/status/export commands arrive with the launch package."
        ),
    )
    parser.add_argument("--version", action="version", version=f"dataflow-launch {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` and run the chosen command; returns the exit status."""
    build_parser().parse_args(argv)
    build_parser().print_help()
    return 0
