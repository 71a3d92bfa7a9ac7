"""``dataflow-launch target …``: commands about the run's target model.

``target save DIR``: write the built-in target as a model directory.
``target vllm-command CONFIG``: print the exact command line (environment included) that starts
a vLLM server for the config's target, for users who run the server themselves; point the run at
it with ``target.server_url``.
"""

from __future__ import annotations

import argparse
from typing import Any

from dataflow.contracts import InvalidInputError
from dataflow.launch.cli.jobs import add_config_arguments, load_cli_config

_SAVE_DESCRIPTION = """\
Write the built-in target (the shipped trained LLaMA, or a random one with --weights random) as
a model directory: config.json, model.safetensors and the tokenizer files with the chat template.
transformers, vLLM (`LLM(model=DIR)`) and the hf engine (`target.model_dir: DIR`) load it."""

_VLLM_DESCRIPTION = """\
Print the command that starts a vLLM server for CONFIG's target (engine vllm): the aux layers
mapped to vLLM's layer ids, the dtype, no prefix caching, eager mode, and this project's
hidden-states connector. Start it on the producer's host (the capture directory must be shared),
then set target.server_url to http://HOST:PORT."""


def register(commands: Any) -> None:
    """Add the ``target`` command group (``save DIR``, ``vllm-command CONFIG``)."""
    parser = commands.add_parser("target", help="commands about the target model")
    sub = parser.add_subparsers(title="target commands", dest="target_command", metavar="COMMAND")
    sub.required = True
    save = sub.add_parser(
        "save",
        help="write the built-in target to DIR",
        description=_SAVE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    save.add_argument("out", metavar="DIR", help="where to write it (must not exist or be empty)")
    save.add_argument("--weights", choices=("trained", "random"), default="trained")
    save.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype of the written weights (default float32)",
    )
    save.set_defaults(run=run_save)
    vllm = sub.add_parser(
        "vllm-command",
        help="print the vLLM server command line for CONFIG",
        description=_VLLM_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(vllm)
    vllm.set_defaults(run=run_vllm_command)


def run_save(args: argparse.Namespace) -> int:
    """Save; print where; return 0."""
    import torch

    from dataflow.launch.builtin.save import save_builtin_target
    from dataflow.launch.config import BuiltinTargetSection

    section = BuiltinTargetSection(weights=args.weights)
    path = save_builtin_target(section, args.out, getattr(torch, args.dtype))
    print(f"saved the built-in target ({args.weights} weights) to {path}", flush=True)
    return 0


def run_vllm_command(args: argparse.Namespace) -> int:
    """Print the server command line; return 0."""
    config = load_cli_config(args)
    if config.target.engine != "vllm":
        raise InvalidInputError(
            f"target.engine is {config.target.engine!r}; vllm-command needs target.engine: vllm"
        )
    from dataflow.launch.engines.vllm_server import printed_command

    print(printed_command(config.target), flush=True)
    return 0
