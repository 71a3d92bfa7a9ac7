"""``eval --engine hf``: :class:`~.hf_spec.HFSpecDecoder` over the held-out prompts."""

from __future__ import annotations

from pathlib import Path

import torch

from dataflow.launch.evaluate.hf_spec import HFSpecDecoder, SpecCounts
from dataflow.launch.evaluate.runner import EvalResult, load_eval_prompts, make_result
from dataflow.launch.evaluate.targets import EvalTarget, load_target


def eval_hf(
    draft_dir: Path,
    target: EvalTarget,
    prompts_path: Path | None,
    k: int,
    max_new_tokens: int,
    limit: int | None = None,
) -> EvalResult:
    """Speculative and target-only greedy decoding of every prompt, in fp32 in this process."""
    from dataflow.train.export import load_draft

    model, tokenizer = load_target(target, torch.float32)
    draft = load_draft(draft_dir).float()
    decoder = HFSpecDecoder(model, draft, tokenizer.eos_token_id)
    prompts = load_eval_prompts(prompts_path, tokenizer, limit)
    spec, plain = SpecCounts(), SpecCounts()
    mismatched = []
    for i, prompt in enumerate(prompts):
        fast = decoder.generate(prompt, max_new_tokens, k, spec)
        slow = decoder.generate_target_only(prompt, max_new_tokens, plain)
        if fast != slow:
            mismatched.append(i)
    return make_result(
        "hf",
        k,
        len(prompts),
        spec.drafts,
        spec.accepted,
        spec.accepted_per_position,
        (spec.generated, spec.seconds),
        (plain.generated, plain.seconds),
        mismatched,
        (str(draft_dir), target.describe()),
    )
