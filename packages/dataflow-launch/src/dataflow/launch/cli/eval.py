"""``dataflow-launch eval [CONFIG | --draft DIR] ...``: the draft measured by speculative decoding."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dataflow.contracts import InvalidInputError

_DESCRIPTION = """\
Measure an exported EAGLE3 draft by real greedy speculative decoding of held-out prompts (by
default the shipped ones the built-in target and the demo never trained on): mean acceptance
length (1 + accepted / drafts), acceptance per draft position, tokens/s with and without the
draft, and a lossless check (the output equals target-only greedy decoding token for token).
  --engine hf    an in-process EAGLE3 chain drafter and verifier (transformers, fp32)
  --engine vllm  vLLM's eagle3 method loading the export as written; vLLM's own counters
Give a run's CONFIG (its draft/ or draft-vllm/ and its target) or --draft DIR (and --target
MODEL_DIR; default the built-in target)."""


def register(commands: Any) -> None:
    """Add the ``eval`` sub-command."""
    parser = commands.add_parser(
        "eval",
        help="measure an exported draft by speculative decoding (hf or vllm)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", metavar="CONFIG", help="a run's config.yaml")
    parser.add_argument("--draft", metavar="DIR", help="an exported draft directory")
    parser.add_argument("--target", metavar="MODEL_DIR", help="the target model directory")
    parser.add_argument("--prompts", metavar="FILE", help="prompt JSONL (default: held-out set)")
    parser.add_argument("--num-speculative-tokens", "-k", dest="k", type=int, default=3)
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--max-new-tokens", type=int, default=48, metavar="N")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="first N prompts")
    parser.add_argument("--plot", metavar="PNG", help="write acceptance per position here")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def resolve_inputs(args: argparse.Namespace) -> tuple[Path, Any]:
    """``(draft_dir, EvalTarget)`` from the arguments (a config, or --draft / --target)."""
    from dataflow.launch.config import BuiltinTargetSection, load_config
    from dataflow.launch.evaluate.targets import EvalTarget

    if args.k < 1:
        raise InvalidInputError(f"--num-speculative-tokens must be >= 1, got {args.k}")
    if args.max_new_tokens < 1:
        raise InvalidInputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.config is None and args.draft is None:
        raise InvalidInputError("give a run's CONFIG or --draft DIR")
    target: EvalTarget | None = None
    draft: Path | None = Path(args.draft) if args.draft else None
    if args.config is not None:
        config = load_config(args.config)
        out = Path(config.run.out_dir)
        if draft is None:
            draft = out / ("draft-vllm" if args.engine == "vllm" else "draft")
        section = config.target
        target = (
            EvalTarget(model_dir=Path(section.model_dir))
            if section.model_dir is not None
            else EvalTarget(builtin=section.builtin)
        )
    if args.target is not None:
        target = EvalTarget(model_dir=Path(args.target))
    if target is None:
        target = EvalTarget(builtin=BuiltinTargetSection())
    assert draft is not None
    if not (draft / "config.json").is_file():
        raise InvalidInputError(f"draft {str(draft)!r} is not an exported draft (no config.json)")
    if target.model_dir is not None and not (target.model_dir / "config.json").is_file():
        raise InvalidInputError(f"--target {str(target.model_dir)!r} is not a model directory")
    return draft, target


def evaluate(args: argparse.Namespace) -> Any:
    """Run the evaluation the arguments describe; return the :class:`EvalResult`."""
    draft, target = resolve_inputs(args)
    prompts = Path(args.prompts) if args.prompts else None
    if args.engine == "vllm":
        from dataflow.launch.evaluate.vllm_eval import eval_vllm, require_vllm

        require_vllm()
        return eval_vllm(draft, target, prompts, args.k, args.max_new_tokens, args.limit)
    from dataflow.launch.evaluate.hf_eval import eval_hf

    return eval_hf(draft, target, prompts, args.k, args.max_new_tokens, args.limit)


def run(args: argparse.Namespace) -> int:
    """Evaluate; print the result (text or JSON); return 0."""
    from dataflow.launch.evaluate.runner import plot_acceptance, render_result

    result = evaluate(args)
    if args.plot:
        plot_acceptance({result.engine: result}, Path(args.plot))
    if args.json:
        print(json.dumps(result.to_json(), sort_keys=True), flush=True)
    else:
        print(render_result(result), flush=True)
    return 0
