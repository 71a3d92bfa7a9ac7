"""``dataflow-launch produce CONFIG``: the producer role of a disaggregated run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dataflow.launch.cli.jobs import add_job_command, load_cli_config, require_disaggregated
from dataflow.launch.run_dir import RunDir

_DESCRIPTION = """\
Run the producer of a disaggregated run (for separate machines; `run` starts both roles on one
host). disaggregated_online: lease prompts from the shared ledger, run the target, put the
features in the shared store, commit refs, close the stream when every prompt is done.
disaggregated_offline: capture every prompt once into the shared store and write
manifest.json. Restarted on the same ledger, it continues where it stopped."""


def register(commands: Any) -> None:
    """Add the ``produce`` sub-command."""
    add_job_command(
        commands,
        "produce",
        help="run the producer role of a disaggregated run",
        description=_DESCRIPTION,
        run=run,
    )


def run(args: argparse.Namespace) -> int:
    """Produce until the prompt pool drains; print what was produced; return 0."""
    config = load_cli_config(args)
    require_disaggregated(config, "produce")
    from dataflow.launch.builders.preflight import preflight

    preflight(config, role="produce")
    run_dir = RunDir(Path(config.run.out_dir)).create()
    report = config.topology.entry("produce")(config, run_dir, progress=args.progress)
    print(
        f"producer {report.outcome}: {report.committed} samples, {report.tokens} tokens in "
        f"{report.seconds:.1f}s ({report.tokens_per_s:.0f} tokens/s)",
        flush=True,
    )
    return 0
