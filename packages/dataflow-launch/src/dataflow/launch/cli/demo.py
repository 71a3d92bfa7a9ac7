"""``dataflow-launch demo [--out DIR] [--steps N]``: the main job on embedded defaults."""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from dataflow.contracts import InvalidInputError

DEFAULT_OUT = "runs/demo"
DEFAULT_STEPS = 300
DEMO_PROMPTS = 400
"""Conversations in the shipped demo prompt set."""

_DESCRIPTION = """\
Train an EAGLE3 draft for the built-in small target, end to end, on this machine (CPU is
enough; a few minutes on 2 cores): a disaggregated online run with a producer PROCESS (the
built-in target on the hf engine, capturing features of the shipped demo prompts) and a
consumer PROCESS (training the draft), sharing a SQLite ledger and a shm:// store. Prints the
summary; DIR gets config.yaml, metrics.jsonl, trained.jsonl, checkpoints/, plots/ (loss,
accuracy and acceptance per TTT step), draft/ (SGLang layout) and the ledger; inspect it with
`dataflow-launch status sqlite:///DIR/ledger.sqlite`. The target is the shipped trained small
LLaMA, in bf16 where the CPU computes it natively and fp32 otherwise. The summary ends with the
mean acceptance length of the initial and the trained draft in real speculative decoding on
held-out prompts (--no-eval skips it)."""

BATCH_SIZE = 4


def demo_settings(out: Path, steps: int) -> dict[str, Any]:
    """The demo's config (as YAML data) for ``steps`` optimizer steps into ``out``.

    Enough prompt tasks are made for exactly ``steps`` whole windows (passes over the demo
    prompts give new sample ids), so every committed sample is trained.
    """
    needed = steps * BATCH_SIZE
    passes = math.ceil(needed / DEMO_PROMPTS)
    per_pass = needed // passes
    # A whole number of windows per run: trim the per-pass count down to fit.
    while per_pass * passes % BATCH_SIZE:
        per_pass -= 1
    tag = hashlib.sha256(str(out).encode()).hexdigest()[:10]
    return {
        "run": {"id": "demo", "out_dir": str(out), "seed": 0, "topology": "disaggregated_online"},
        "target": {
            "engine": "hf",
            "builtin": {"weights": "trained"},
            "dtype": "auto",
            "batch_size": 8,
        },
        "data": {"max_length": 160, "max_prompts": per_pass, "passes": passes},
        "store": {"uri": f"shm://demo-{tag}", "options": {"budget_bytes": 1 << 30}},
        "ledger": {"uri": f"sqlite://{out}/ledger.sqlite"},
        "flow": {"high_watermark": 64, "low_watermark": 32},
        "producer": {"workers": 1},
        "trainer": {
            "batch_size": BATCH_SIZE,
            "lr": 3e-3,
            "warmup_steps": 5,
            "total_steps": per_pass * passes // BATCH_SIZE,
            "checkpoint_every": 25,
            "keep_last": 2,
            "ttt_length": 7,
            "draft_vocab_size": 512,
        },
    }


def register(commands: Any) -> None:
    """Add the ``demo`` sub-command."""
    parser = commands.add_parser(
        "demo",
        help="the main job on embedded defaults: train a draft for the built-in target",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", default=DEFAULT_OUT, metavar="DIR", help=f"run directory (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        metavar="N",
        help=f"optimizer steps to train (default {DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--no-eval",
        dest="eval",
        action="store_false",
        help="skip the closing measurement of the initial and the trained draft by speculative "
        "decoding (hf engine, k=3, 8 held-out prompts)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; print the summary; return 0."""
    from dataflow.launch.builders.supervise import run_disaggregated
    from dataflow.launch.cli.jobs import finish_run, prepare_run_dir
    from dataflow.launch.config import config_from_mapping

    if args.steps < 1:
        raise InvalidInputError(f"--steps must be >= 1, got {args.steps}")
    out = Path(args.out).resolve()
    if (out / "ledger.sqlite").exists() or (out / "checkpoints").exists():
        raise InvalidInputError(f"{out} already holds a run; choose another --out or remove it")
    settings = demo_settings(out, args.steps)
    config = config_from_mapping(settings)
    run_dir = prepare_run_dir(config, resume=False)
    source = run_dir.root / "demo.yaml"
    source.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    print(f"demo: training a draft for the built-in target into {out}", flush=True)
    run_disaggregated(config, run_dir, (str(source),), resume=False, progress=args.progress)
    serving: Callable[[], dict[str, Any]] | None = None
    if args.eval:
        from dataflow.launch.evaluate.before_after import eval_before_after

        serving = functools.partial(eval_before_after, config, run_dir)
    finish_run(config, run_dir, serving)
    return 0
