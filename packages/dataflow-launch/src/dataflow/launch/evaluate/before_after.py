"""A run's draft measured by speculative decoding before training and after (``demo --eval``).

"Before" is the draft the run started from: :func:`~dataflow.launch.builders.common.trainer_objective`
is deterministic for ``run.seed``, so exporting a freshly built objective gives the run's initial
draft exactly (written to ``draft-initial/``). Both are measured with the ``hf`` engine on the
shipped held-out prompts; the plot of acceptance per position goes to
``plots/eval_acceptance.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dataflow.launch.config import LaunchConfig
from dataflow.launch.run_dir import RunDir

INITIAL_DRAFT = "draft-initial"
PLOT_FILE = "eval_acceptance.png"


def eval_before_after(
    config: LaunchConfig,
    run_dir: RunDir,
    *,
    k: int = 3,
    limit: int | None = 8,
    max_new_tokens: int = 32,
) -> dict[str, dict[str, Any]]:
    """``{"eval before": result, "eval after": result}`` (JSON objects of
    :class:`~dataflow.launch.evaluate.runner.EvalResult`) for the initial and the trained
    (``draft/``) drafts of ``run_dir``; writes ``draft-initial/`` and the plot.
    """
    from dataflow.launch.builders.common import trainer_objective
    from dataflow.launch.evaluate.hf_eval import eval_hf
    from dataflow.launch.evaluate.runner import plot_acceptance
    from dataflow.launch.evaluate.targets import EvalTarget
    from dataflow.train.export import export_draft

    initial = run_dir.root / INITIAL_DRAFT
    if not initial.exists():
        export_draft(trainer_objective(config), initial)
    section = config.target
    target = (
        EvalTarget(model_dir=Path(section.model_dir))
        if section.model_dir is not None
        else EvalTarget(builtin=section.builtin)
    )
    before = eval_hf(initial, target, None, k, max_new_tokens, limit)
    after = eval_hf(run_dir.draft, target, None, k, max_new_tokens, limit)
    plot_acceptance({"before": before, "after": after}, run_dir.plots / PLOT_FILE)
    return {"eval before": before.to_json(), "eval after": after.to_json()}
