"""``dataflow-launch status LEDGER_URI [--json]``: what a run's ledger says, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dataflow.contracts.errors import InvalidInputError, NotFoundError
from dataflow.contracts.protocols import Ledger
from dataflow.contracts.states import LedgerStatus
from dataflow.contracts.uris import parse_ledger_uri

READABLE_SCHEMES = ("sqlite", "redis")
"""Ledgers another process can read; ``memory://`` and ``noop://`` live and die in one process."""

_HELP = "show a run's ledger: sample and prompt counts, run markers, in-flight bytes"
_DESCRIPTION = """\
Show what a run's ledger records: samples per state (committed, assigned, trained, released,
dropped, with drop reasons), prompts per state (pending, leased, done, failed), the producer
and consumer markers, the quantum, the durable step and the bytes in flight.

LEDGER_URI is sqlite:///path/to/ledger.sqlite or redis://host:port/db (a running run's ledger
may be read while it runs). The ledger is only read: a missing SQLite file is an error, never
created. Exit status 2 with a one-line error when the ledger cannot be read or holds no run."""


def register(commands: Any) -> None:
    """Add the ``status`` sub-command to ``commands`` (argparse's sub-parsers action)."""
    parser = commands.add_parser(
        "status",
        help=_HELP,
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "ledger_uri", metavar="LEDGER_URI", help="sqlite:///path or redis://host:port/db"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the status of the ledger at ``args.ledger_uri``; return 0."""
    # Imported here, not at the top: `--help` and `--version` need neither backend nor rich.
    from dataflow.launch.cli.status_view import render_table, status_record

    ledger = open_existing_ledger(args.ledger_uri)
    try:
        status = ledger.status()
    finally:
        ledger.close()
    if _holds_no_run(status):
        # Most often a wrong path, database or namespace: say so rather than print zeros.
        raise NotFoundError(
            f"the ledger at {args.ledger_uri} holds no run (no run id, sample or prompt)"
        )
    if args.json:
        json.dump(status_record(args.ledger_uri, status), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render_table(args.ledger_uri, status)
    return 0


def _holds_no_run(status: LedgerStatus) -> bool:
    counts = [*status.samples.values(), *status.prompts.values()]
    return not status.markers.run_id and not any(counts)


def open_existing_ledger(uri: str) -> Ledger:
    """Open a ledger that already exists, for reading.

    Refuses (``InvalidInputError``) a ledger kind no other process can read and (``NotFoundError``)
    an SQLite path with no file or an empty one, so nothing is created; Redis errors (an
    unreachable server: ``BackendUnavailableError``) and corrupt files come from ``open_ledger``.
    """
    parsed = parse_ledger_uri(uri)
    if parsed.scheme not in READABLE_SCHEMES:
        raise InvalidInputError(
            f"status reads a shared ledger (sqlite:// or redis://), not {parsed.scheme}://: "
            f"a {parsed.scheme}:// ledger lives only inside the process that opened it"
        )
    if parsed.scheme == "sqlite":
        path = Path(parsed.location)
        if not path.exists():
            raise NotFoundError(f"no ledger at {path}: the file does not exist")
        if path.is_file() and path.stat().st_size == 0:
            raise NotFoundError(f"no ledger at {path}: the file is empty")
    from dataflow.control.ledger import open_ledger

    if parsed.scheme == "sqlite":
        # mode=ro: reading never switches a file to WAL or writes a byte (a foreign SQLite
        # file stays byte-identical when it is refused).
        return open_ledger(uri, read_only=True)
    return open_ledger(uri)
