"""Pieces every builder opens the same way: ledger, store, prompts and tasks, the objective."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dataflow.contracts import FeatureStore, Ledger, PromptTask
from dataflow.control import open_ledger
from dataflow.launch.builders.draft import build_objective
from dataflow.launch.builders.roles import ControlPlan
from dataflow.launch.builders.target_side import load_target_side
from dataflow.launch.config import LaunchConfig
from dataflow.launch.data import PromptSet, build_tasks, load_prompts
from dataflow.launch.producer import ledger_options, regenerate_tokens, store_options
from dataflow.store import open_store
from dataflow.train.eagle3 import Eagle3Objective
from dataflow.train.eagle3.sequence import SequenceExchange


def open_plan_ledger(config: LaunchConfig, plan: ControlPlan) -> Ledger:
    """The ledger the control plan names, with the config's ledger options."""
    return open_ledger(plan.ledger_uri, **ledger_options(config))


def open_run_store(config: LaunchConfig, **extra: Any) -> FeatureStore:
    """The run's feature store, opened from ``config.store`` (plus ``extra`` options)."""
    return open_store(config.store.uri, **{**store_options(config), **extra})


@dataclass(frozen=True)
class Prompts:
    """The run's prompt set and its tasks (one per prompt per pass)."""

    prompts: PromptSet
    tasks: tuple[PromptTask, ...]


def load_run_prompts(config: LaunchConfig, tokenizer: Any, target_version: str) -> Prompts:
    """Load ``config.data`` with ``tokenizer`` and cut it into tasks, deterministically.

    Malformed lines beyond ``data.max_malformed_lines`` raise ``InvalidInputError`` naming them.
    With ``producer.regenerate`` the tasks hold prompts only (the target writes the responses).
    """
    prompts = load_prompts(config.data, tokenizer, regenerate_tokens=regenerate_tokens(config))
    tasks = build_tasks(
        prompts.prompts,
        run_id=config.run.id,
        passes=config.data.passes,
        max_length=config.data.max_length,
        seed=config.run.seed,
        shuffle=config.data.shuffle,
        target_version=target_version,
    )
    return Prompts(prompts, tuple(tasks))


def trainer_objective(
    config: LaunchConfig, *, sequence_parallel: SequenceExchange | None = None
) -> Eagle3Objective:
    """The draft objective of ``config`` (target side loaded, vocabulary map from the prompts),
    on this rank's sequence shard when ``sequence_parallel`` is given. With
    ``producer.regenerate`` the vocabulary map counts the prompts the target answers (its
    responses are not written yet when training starts).
    """
    target = load_target_side(config)
    prompts = load_prompts(
        config.data, target.tokenizer, regenerate_tokens=regenerate_tokens(config)
    )
    return build_objective(config, target, prompts, sequence_parallel=sequence_parallel)
