"""The rows a ledger backend stores per sample and per prompt (records stay separate)."""

from __future__ import annotations

from typing import NamedTuple

from dataflow.contracts.states import PromptState, SampleState


class SampleRow(NamedTuple):
    """Where one sample is: its commit order (``seq``), state and the state's arguments.

    ``rank``/``window`` are set while ASSIGNED (and kept after), ``step`` once TRAINED,
    ``reason`` once DROPPED; -1 / "" otherwise. ``nbytes`` is the ref's estimated size.
    """

    sample_id: str
    seq: int
    state: SampleState
    rank: int = -1
    window: int = -1
    step: int = -1
    reason: str = ""
    nbytes: int = 0


class PromptRow(NamedTuple):
    """Where one prompt task is: FIFO order (``seq``), state, attempt, lease and failure."""

    task_id: str
    seq: int
    state: PromptState
    attempt: int = 0
    worker: str = ""
    deadline: float = 0.0
    reason: str = ""


SampleChange = tuple[SampleState, SampleRow]
"""A sample row's previous state and its new row (backends keep per-state indexes)."""

PromptChange = tuple[PromptState, PromptRow]
"""A prompt row's previous state and its new row."""
