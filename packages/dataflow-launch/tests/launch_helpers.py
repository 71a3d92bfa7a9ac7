"""Helpers shared by this package's tests (a unique module name: tests dirs share sys.path)."""

from __future__ import annotations

TINY = {
    "hidden_size": 32,
    "num_layers": 8,
    "num_heads": 2,
    "num_kv_heads": 1,
    "intermediate_size": 64,
}
"""A built-in target small enough for unit tests."""


def make_tasks(engine, count: int, *, prefix: str = "t", max_length: int = 64):
    """``count`` PromptTasks over the first demo prompts."""
    from dataflow.launch.config import DataSection
    from dataflow.launch.data import build_tasks, load_prompts

    prompts = load_prompts(
        DataSection(max_prompts=count, max_length=max_length), engine.tokenizer
    ).prompts
    return build_tasks(
        prompts, run_id=prefix, passes=1, max_length=max_length, target_version=engine.info.version
    )
