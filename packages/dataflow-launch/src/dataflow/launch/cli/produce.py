"""``dataflow-launch produce CONFIG``: the producer role of a disaggregated run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dataflow.contracts import InvalidInputError
from dataflow.launch.cli.jobs import DISAGGREGATED, add_config_arguments, load_cli_config
from dataflow.launch.run_dir import RunDir

_DESCRIPTION = """\
Run the producer of a disaggregated run (for separate machines; `run` starts both roles on one
host). disaggregated_online: lease prompts from the shared ledger, run the target, put the
features in the shared store, commit refs, close the stream when every prompt is done.
disaggregated_offline: capture every prompt once into the shared store and write
manifest.json. Restarted on the same ledger, it continues where it stopped."""


def register(commands: Any) -> None:
    """Add the ``produce`` sub-command."""
    parser = commands.add_parser(
        "produce",
        help="run the producer role of a disaggregated run",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Produce until the prompt pool drains; print what was produced; return 0."""
    config = load_cli_config(args)
    if config.run.topology not in DISAGGREGATED:
        raise InvalidInputError(
            f"produce runs the producer of a disaggregated run; run.topology is "
            f"{config.run.topology!r}, which runs in one process: use `dataflow-launch run`"
        )
    from dataflow.launch.builders.preflight import preflight

    preflight(config)
    run_dir = RunDir(Path(config.run.out_dir)).create()
    if config.run.topology == "disaggregated_online":
        from dataflow.launch.builders.online import produce_online

        report = produce_online(config, run_dir, progress=args.progress)
    else:
        from dataflow.launch.builders.offline import produce_offline

        report = produce_offline(config, run_dir, progress=args.progress)
    print(
        f"producer {report.outcome}: {report.committed} samples, {report.tokens} tokens in "
        f"{report.seconds:.1f}s ({report.tokens_per_s:.0f} tokens/s)",
        flush=True,
    )
    return 0
