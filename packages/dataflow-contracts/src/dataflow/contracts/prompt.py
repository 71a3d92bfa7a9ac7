"""PromptTask: one unit of rollout work."""

from __future__ import annotations

from dataclasses import dataclass, field

from dataflow.contracts.checks import check_non_negative, check_text
from dataflow.contracts.errors import InvalidInputError
from dataflow.contracts.frozen import JsonMap, freeze_map
from dataflow.contracts.ids import validate_task_id


@dataclass(frozen=True)
class PromptTask:
    """A prompt to roll out through the target model.

    ``payload`` is a JSON object: ``{"input_ids": [...]}`` for raw token ids, or
    ``{"messages": [{"role": …, "content": …}, …]}`` for a chat conversation. ``attempt`` counts
    retries (0 on first lease). Guarantees: a safe ``task_id``, ``max_length`` ≥ 1, read-only
    payload and metadata.
    """

    task_id: str
    payload: JsonMap = field(hash=False)
    max_length: int = 2048
    attempt: int = 0
    target_version: str = "unknown"
    draft_weight_version: str | None = None
    metadata: JsonMap = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        validate_task_id(self.task_id)
        object.__setattr__(self, "payload", freeze_map(self.payload, "PromptTask.payload"))
        check_non_negative("PromptTask", "max_length", self.max_length)
        if self.max_length < 1:
            raise InvalidInputError("PromptTask.max_length must be >= 1")
        check_non_negative("PromptTask", "attempt", self.attempt)
        check_text("PromptTask", "target_version", self.target_version)
        if self.draft_weight_version is not None:
            check_text("PromptTask", "draft_weight_version", self.draft_weight_version)
        object.__setattr__(self, "metadata", freeze_map(self.metadata, "PromptTask.metadata"))
