"""Helpers shared by this package's tests (a unique module name: tests dirs share sys.path)."""

from __future__ import annotations

TINY = {
    "weights": "random",
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


class ObservedEngine:
    """A real engine plus hooks: records the task ids it captured, can call ``on_capture``
    after each batch (e.g. to stop a producer), and can inject failures for the first
    ``fail_first`` calls — a fault a real engine cannot produce on demand.
    """

    def __init__(self, engine, *, fail_first: int = 0, fail_always: bool = False, on_capture=None):
        self.engine = engine
        self.captured: list[str] = []
        self.calls = 0
        self.fail_first = fail_first
        self.fail_always = fail_always
        self.on_capture = on_capture

    @property
    def info(self):
        return self.engine.info

    def feature_specs(self, num_tokens):
        return self.engine.feature_specs(num_tokens)

    def target_head(self):
        return self.engine.target_head()

    def capture(self, tasks):
        self.calls += 1
        if self.fail_always or self.calls <= self.fail_first:
            raise RuntimeError(f"injected capture failure #{self.calls}")
        samples = self.engine.capture(tasks)
        self.captured.extend(t.task_id for t in tasks)
        if self.on_capture is not None:
            self.on_capture(self)
        return samples

    def close(self):
        pass
