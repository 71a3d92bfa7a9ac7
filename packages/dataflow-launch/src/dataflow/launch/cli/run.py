"""``dataflow-launch run CONFIG [--set k=v ...] [--resume]``: any topology from a config."""

from __future__ import annotations

import argparse
from typing import Any

from dataflow.launch.cli.jobs import (
    add_job_command,
    config_argv,
    finish_run,
    load_cli_config,
    prepare_run_dir,
)
from dataflow.launch.config import LaunchConfig

_DESCRIPTION = """\
Run a whole training job from CONFIG on this host, whatever its topology:
colocated_offline (feature files, one process), colocated_online (producer thread + trainer),
disaggregated_offline and disaggregated_online (a producer process and a consumer process; the
consumer runs under torchrun when trainer.dp_size x trainer.sp_size > 1). The run directory (run.out_dir) gets
config.yaml, metrics.jsonl, trained.jsonl, checkpoints/, plots/, draft/ and summary.json."""


def register(commands: Any) -> None:
    """Add the ``run`` sub-command."""
    add_job_command(
        commands,
        "run",
        help="run a training job of any topology from a config",
        description=_DESCRIPTION,
        run=run,
        resume_help="continue the run in run.out_dir from its checkpoint",
    )


def topology_is_disaggregated(config: LaunchConfig) -> bool:
    """Whether the run's roles are separate processes sharing a ledger."""
    return config.topology.separate_roles


def run(args: argparse.Namespace) -> int:
    """Run the job; print the summary; return 0."""
    config = load_cli_config(args)
    from dataflow.launch.builders.preflight import check_fresh_ledger, preflight

    preflight(config)
    if not args.resume and topology_is_disaggregated(config):
        check_fresh_ledger(config)
    run_dir = prepare_run_dir(config, resume=args.resume)
    if not config.topology.separate_roles:
        config.topology.entry("run")(config, run_dir, resume=args.resume, progress=args.progress)
    else:
        from dataflow.launch.builders.supervise import run_disaggregated

        run_disaggregated(
            config, run_dir, config_argv(args), resume=args.resume, progress=args.progress
        )
    finish_run(config, run_dir)
    return 0
