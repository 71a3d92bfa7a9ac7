"""``dataflow-launch export RUN_DIR --format sglang|vllm|hf --out DIR``: write a run's draft."""

from __future__ import annotations

import argparse
from typing import Any

_DESCRIPTION = """\
Export the draft of a run directory's newest checkpoint: `sglang` (the layout SGLang's
LlamaForCausalLMEagle3 loads: config.json + model.safetensors, no embedding) or `hf` (adds the
embedding) or `vllm` (the SGLang layout with the aux layer ids vLLM reads: trained id + 1,
since vLLM counts "after k decoder layers" and SGLang adds the 1 itself). DIR must not exist or be empty; it appears complete or not at all. The checkpoint
is verified against the manifest the run signed when it saved it before any of it is read; a
refused one is named with the file that failed, and nothing is written."""


def register(commands: Any) -> None:
    """Add the ``export`` sub-command."""
    parser = commands.add_parser(
        "export",
        help="export a run's trained draft (SGLang or HF layout)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (has config.yaml)")
    parser.add_argument("--format", dest="fmt", choices=("sglang", "vllm", "hf"), default="sglang")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the draft")
    parser.add_argument(
        "--checkpoint",
        metavar="STEP_DIR",
        help="export this checkpoint directory (checkpoints/step-NNNNNNNN) instead of the newest",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Export; print where; return 0."""
    from dataflow.launch.builders.export import export_run

    path = export_run(args.run_dir, args.fmt, args.out, args.checkpoint)
    print(f"exported the {args.fmt} draft to {path}", flush=True)
    return 0
