"""``dataflow-launch consume CONFIG [--resume]``: the trainer role of a disaggregated run."""

from __future__ import annotations

import argparse
from typing import Any

from dataflow.launch.cli.jobs import (
    add_job_command,
    finish_run,
    load_cli_config,
    prepare_run_dir,
    require_disaggregated,
)

_DESCRIPTION = """\
Run the consumer (trainer) of a disaggregated run: train the draft from the shared ledger and
store (online) or from the producer's manifest (offline) until the data ends, then export the
draft, draw the plots and print the summary. Under torchrun every rank runs this command
(trainer.dp_size x trainer.sp_size must equal the number of ranks). --resume continues from the
newest checkpoint in run.out_dir after a crash: samples trained after that checkpoint are
trained again and listed once in trained.jsonl."""


def register(commands: Any) -> None:
    """Add the ``consume`` sub-command."""
    add_job_command(
        commands,
        "consume",
        help="run the consumer (trainer) role of a disaggregated run",
        description=_DESCRIPTION,
        run=run,
        resume_help="continue from the newest checkpoint in run.out_dir",
    )


def run(args: argparse.Namespace) -> int:
    """Train to the end of the data; rank 0 finishes the run (draft, plots, summary)."""
    config = load_cli_config(args)
    require_disaggregated(config, "consume")
    from dataflow.launch.builders.preflight import preflight
    from dataflow.launch.builders.ranks import in_torchrun

    preflight(config, role="consume")

    rank = 0
    if in_torchrun():
        import os

        rank = int(os.environ.get("RANK", "0"))
    run_dir = prepare_run_dir(config, resume=args.resume) if rank == 0 else None
    consume = config.topology.entry("consume")
    from pathlib import Path

    from dataflow.launch.run_dir import RunDir

    consume(
        config,
        run_dir or RunDir(Path(config.run.out_dir)),
        resume=args.resume,
        progress=args.progress,
    )
    if run_dir is not None:
        finish_run(config, run_dir)
    return 0
