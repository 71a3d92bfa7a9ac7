"""The EAGLE3 objective of a run: draft shape from the target, frozen head, vocabulary map."""

from __future__ import annotations

from collections import Counter

from dataflow.launch.builders.target_side import TargetSide
from dataflow.launch.config import LaunchConfig
from dataflow.launch.data import PromptSet
from dataflow.train.eagle3 import Eagle3Config, Eagle3Objective, build_vocab_map
from dataflow.train.eagle3.sequence import SequenceExchange


def draft_config(config: LaunchConfig, target: TargetSide) -> Eagle3Config:
    """The draft's config: the target's width, heads and vocabulary, the captured layers, the
    trainer's TTT length and draft vocabulary size.
    """
    return Eagle3Config.from_target_config(
        target.model_config,
        draft_vocab_size=config.trainer.draft_vocab_size,
        target_layers=target.aux_layer_ids,
        ttt_length=config.trainer.ttt_length,
    )


def vocab_counts(prompts: PromptSet) -> Counter[int]:
    """Token counts over the prompt set: the draft vocabulary is its most frequent ids.

    Every role derives the map from the same prompt set, so producer and trainer processes
    (and colocated and disaggregated runs) agree on it without shipping it.
    """
    counts: Counter[int] = Counter()
    for prompt in prompts.prompts:
        counts.update(prompt.input_ids)
    return counts


def build_objective(
    config: LaunchConfig,
    target: TargetSide,
    prompts: PromptSet,
    *,
    sequence_parallel: SequenceExchange | None = None,
) -> Eagle3Objective:
    """The objective the trainer optimises, deterministic for ``config.run.seed``.

    Raises ``InvalidInputError`` when the draft vocabulary is larger than the target's.
    """
    eagle = draft_config(config, target)
    objective = Eagle3Objective(eagle, seed=config.run.seed, sequence_parallel=sequence_parallel)
    objective.init_from_target(target.embed_weight, target.lm_head_weight)
    counts = vocab_counts(prompts)
    objective.set_vocab_map(
        *build_vocab_map(dict(counts), target.vocab_size, eagle.draft_vocab_size)
    )
    return objective
