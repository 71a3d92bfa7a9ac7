"""``dataflow-launch target save DIR``: the built-in target as a model directory."""

from __future__ import annotations

import argparse
from typing import Any

_DESCRIPTION = """\
Write the built-in target (the shipped trained LLaMA, or a random one with --weights random) as
a model directory: config.json, model.safetensors and the tokenizer files with the chat template.
transformers, vLLM (`LLM(model=DIR)`) and the hf engine (`target.model_dir: DIR`) load it."""


def register(commands: Any) -> None:
    """Add the ``target`` sub-command (``target save DIR``)."""
    parser = commands.add_parser(
        "target",
        help="the built-in target as a model directory (target save DIR)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(title="actions", dest="action", metavar="ACTION", required=True)
    save = actions.add_parser(
        "save", help="write the built-in target to DIR", description=_DESCRIPTION
    )
    save.add_argument("out", metavar="DIR", help="where to write it (must not exist or be empty)")
    save.add_argument("--weights", choices=("trained", "random"), default="trained")
    save.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype of the written weights (default float32)",
    )
    save.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Save; print where; return 0."""
    import torch

    from dataflow.launch.builtin.save import save_builtin_target
    from dataflow.launch.config import BuiltinTargetSection

    section = BuiltinTargetSection(weights=args.weights)
    path = save_builtin_target(section, args.out, getattr(torch, args.dtype))
    print(f"saved the built-in target ({args.weights} weights) to {path}", flush=True)
    return 0
