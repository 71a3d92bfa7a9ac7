"""What the run-type commands share: config arguments, the fresh-or-resume rule, and the
finish (draft export, plots, summary).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dataflow.contracts import InvalidInputError
from dataflow.contracts.uris import parse_ledger_uri
from dataflow.launch.config import LaunchConfig, load_config
from dataflow.launch.run_dir import RunDir

log = logging.getLogger(__name__)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``CONFIG``, repeatable ``--set a.b=value`` and ``--no-progress``."""
    parser.add_argument("config", metavar="CONFIG", help="the run's YAML config")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set trainer.lr=5e-4 (repeatable)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars"
    )


def add_job_command(
    commands: Any,
    name: str,
    *,
    help: str,
    description: str,
    run: Callable[[argparse.Namespace], int],
    resume_help: str | None = None,
) -> argparse.ArgumentParser:
    """A sub-command taking CONFIG and ``--set`` overrides (and ``--resume`` with its help)."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    if resume_help is not None:
        parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.set_defaults(run=run)
    return parser


def require_disaggregated(config: LaunchConfig, role: str) -> None:
    """Refuse a one-process topology for a role command (``produce`` / ``consume``)."""
    if not config.topology.separate_roles:
        raise InvalidInputError(
            f"{role} runs the {'producer' if role == 'produce' else 'trainer'} of a "
            f"disaggregated run; run.topology is {config.run.topology!r}, which runs in one "
            "process: use `dataflow-launch run`"
        )


def load_cli_config(args: argparse.Namespace) -> LaunchConfig:
    """The config named by ``args.config`` with ``args.overrides`` applied (validated); logs
    the resolved config (secrets redacted) at ``info``.
    """
    config = load_config(Path(args.config), list(args.overrides))
    if log.isEnabledFor(logging.INFO):
        from dataflow.launch.config.loading import dump_yaml, fingerprint

        log.info(
            "run %s (%s, %s): ledger %s, store %s, config fingerprint %s\n%s",
            config.run.id,
            config.run.topology,
            config.run.deployment_mode,
            config.ledger.uri,
            config.store.uri,
            fingerprint(config)[:12],
            dump_yaml(config).rstrip(),
        )
    return config


def config_argv(args: argparse.Namespace) -> tuple[str, ...]:
    """``CONFIG --set ...`` again, to hand the same config to a child role."""
    out: list[str] = [str(Path(args.config).resolve())]
    for item in args.overrides:
        out += ["--set", item]
    return tuple(out)


def prepare_run_dir(config: LaunchConfig, *, resume: bool) -> RunDir:
    """The run directory, created, with the resolved config written.

    A fresh run refuses a directory that already holds checkpoints (it would silently continue
    or overwrite an earlier run): ``InvalidInputError`` naming ``--resume``.
    """
    run_dir = RunDir(Path(config.run.out_dir))
    if not resume and run_dir.has_checkpoint():
        raise InvalidInputError(
            f"{run_dir.root} already holds checkpoints of a run; pass --resume to continue it, "
            "or set run.out_dir to a new directory"
        )
    run_dir.write_config(config)
    return run_dir


def ledger_counts(config: LaunchConfig) -> dict[str, Any]:
    """Sample counts per state of a shareable ledger (empty for in-process ones)."""
    if parse_ledger_uri(config.ledger.uri).scheme not in ("sqlite", "redis"):
        return {}
    from dataflow.launch.builders.common import open_plan_ledger
    from dataflow.launch.builders.roles import control_plan

    ledger = open_plan_ledger(config, control_plan(config, leases_prompts=False))
    try:
        return {k: v for k, v in ledger.status().samples.items()}
    finally:
        ledger.close()


def run_precision(config: LaunchConfig) -> dict[str, dict[str, str]]:
    """The dtypes the run's target (hf engine) and trainer use on this host, and why."""
    from dataflow.launch.builders.ranks import trainer_bf16
    from dataflow.launch.precision import choose_dtype

    target = config.target
    if target.engine == "hf":
        chosen = choose_dtype(target.dtype, target.device)
    else:
        chosen = choose_dtype("bfloat16" if target.dtype == "auto" else target.dtype, "cpu")
        chosen = type(chosen)(chosen.dtype, f"the {target.engine} server's features, as configured")
    trainer = trainer_bf16(config)
    return {
        "target": {"dtype": chosen.dtype, "reason": chosen.reason},
        "trainer": {"dtype": trainer.dtype, "reason": trainer.reason},
    }


def finish_run(
    config: LaunchConfig, run_dir: RunDir, serving: Callable[[], dict[str, Any]] | None = None
) -> None:
    """Export the draft into ``draft/`` (SGLang form) and ``draft-vllm/`` (vLLM's layer ids),
    run ``serving`` (e.g. the demo's eval) if given, draw the plots, print the summary.
    """
    from dataflow.launch.builders.export import export_from_checkpoint
    from dataflow.launch.plots import write_plots
    from dataflow.launch.summary import collect_summary, render_summary

    if not run_dir.draft.exists():
        export_from_checkpoint(config, run_dir, "sglang", run_dir.draft)
    if not run_dir.draft_vllm.exists():
        export_from_checkpoint(config, run_dir, "vllm", run_dir.draft_vllm)
    served = serving() if serving is not None else {}
    if run_dir.metrics.is_file():
        if importlib.util.find_spec("matplotlib") is None:
            print("plots skipped: matplotlib is not installed (dataflow-launch[plots])", flush=True)
        else:
            write_plots(run_dir.metrics, run_dir.plots)
    summary = collect_summary(
        run_dir, config.run.topology, ledger_counts(config), run_precision(config), served
    )
    print(render_summary(summary), file=sys.stdout, flush=True)
