"""The top-level parser of ``dataflow-launch`` and the entry point that runs a command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dataflow.contracts.errors import DataflowError
from dataflow.launch.cli import consume, demo, eval, export, produce, run, status, target
from dataflow.launch.cli.logs import LEVELS, LOG_LEVEL_ENV, configure_logging, default_level
from dataflow.launch.cli.signals import exit_status, follow_supervisor, stop_handlers
from dataflow.launch.version import __version__

EXIT_ERROR = 2
"""Exit status for a refused command (bad input, a backend that cannot be reached)."""

EXIT_INTERRUPTED = 130
"""Ctrl-C; ``SIGTERM`` returns 143 and ``SIGHUP`` 129 (``128 + signal``), after the same cleanup."""

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE

_DESCRIPTION = """\
Train EAGLE3 draft models from a live target model.

Commands: demo (start here: it trains a draft for the built-in small target on this machine and
prints a summary), run CONFIG (any topology), produce and consume (the two roles of a
disaggregated run, for separate machines), status LEDGER_URI (a run's ledger), export (a
run's draft for SGLang, vLLM or HF), eval (the draft measured by speculative decoding in vLLM
or in-process), target save DIR (the built-in target as a model directory) and target
vllm-command CONFIG (the vLLM server command line)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dataflow-launch``, with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="dataflow-launch",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dataflow-launch {__version__}")
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LEVELS,
        default=None,
        help=f"how much the dataflow.* loggers write to stderr (default: ${LOG_LEVEL_ENV} or "
        "warning); child role processes inherit it",
    )
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for command in (demo, run, produce, consume, status, export, eval, target):
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names (default: ``sys.argv[1:]``); return the exit status.

    No command prints the help and returns 0. A command refused for a reason the user can fix
    (any ``DataflowError``: bad URI, missing file, unreachable backend, corrupt ledger) prints
    one line ``dataflow-launch COMMAND: error: …`` on stderr, without a traceback, and returns
    2, like a usage error; Ctrl-C returns 130, and ``SIGTERM`` / ``SIGHUP`` stop the command
    the same way and return 143 / 129 (``cli/signals.py``). A reader that closes the pipe early
    (``status --json | head``) ends the command quietly with 141, as ``SIGPIPE`` would.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    with stop_handlers():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        configure_logging(args.log_level or default_level())
        follow_supervisor()
        code: int = args.run(args)
    except DataflowError as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"dataflow-launch {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        status = exit_status(exc)
        cause = f" by {exc}" if status != EXIT_INTERRUPTED else ""
        print(f"dataflow-launch {args.command}: interrupted{cause}", file=sys.stderr)
        return status
    except BrokenPipeError:
        # Python would report the unflushed stdout again at exit; point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    return code
