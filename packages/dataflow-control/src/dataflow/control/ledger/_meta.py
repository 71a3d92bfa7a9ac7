"""Typed view of the run-level markers and the names of the counters kept beside transitions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from dataflow.contracts.errors import CorruptRecordError
from dataflow.contracts.states import (
    ConsumerState,
    ProducerState,
    PromptState,
    RunMarkers,
    SampleState,
)


@dataclass(frozen=True)
class RunMeta:
    """Every run-level marker, stored as one string per field.

    ``next_seq``/``next_prompt_seq``/``next_window`` are the next commit order, FIFO order and
    window id to hand out; they only grow, so order survives restarts and reconciles.
    """

    run_id: str = ""
    quantum: int = 0
    dp_size: int = 0
    durable_step: int = -1
    trained_step: int = -1
    released_through: int = -1
    producer: ProducerState = ProducerState.NOT_STARTED
    producer_reason: str = ""
    consumer: ConsumerState = ConsumerState.NOT_STARTED
    consumer_reason: str = ""
    next_seq: int = 0
    next_prompt_seq: int = 0
    next_window: int = 0
    target_version: str = ""
    drift_mean: str = ""
    drift_max: int = -1

    @classmethod
    def load(cls, values: dict[str, str]) -> RunMeta:
        """Parse stored strings; a value that does not parse is a corrupt ledger."""
        kwargs: dict[str, Any] = {}
        for name, parse in _PARSERS:
            raw = values.get(name)
            if raw is None:
                continue
            try:
                kwargs[name] = parse(raw)
            except ValueError:
                raise CorruptRecordError(
                    f"ledger run marker {name!r} holds {raw!r}, which does not parse"
                ) from None
        return cls(**kwargs)

    def changes(self, **updates: Any) -> tuple[RunMeta, dict[str, str]]:
        """The updated view and the strings to store for the changed fields."""
        unknown = updates.keys() - _FIELD_NAMES
        if unknown:
            raise TypeError(f"RunMeta has no field(s) {sorted(unknown)}")
        # A copy of the fields (dataclasses.replace re-runs __init__: slow in every commit).
        new = object.__new__(RunMeta)
        new.__dict__.update(self.__dict__, **updates)
        return new, {name: str(value) for name, value in updates.items()}

    def markers(self) -> RunMarkers:
        """The public record of these markers."""
        return RunMarkers(
            run_id=self.run_id,
            quantum=self.quantum,
            durable_step=self.durable_step,
            producer=self.producer,
            producer_reason=self.producer_reason,
            consumer=self.consumer,
            consumer_reason=self.consumer_reason,
            trained_step=self.trained_step,
            released_through=self.released_through,
            dp_size=self.dp_size,
            target_version=self.target_version,
        )


def _parser(name: str, default: Any) -> Callable[[str], Any]:
    if name == "producer":
        return ProducerState
    if name == "consumer":
        return ConsumerState
    return int if isinstance(default, int) else str


_FIELD_NAMES = frozenset(f.name for f in fields(RunMeta))
# Field name and parser of every marker, computed once (``load`` runs in every transaction).
_PARSERS: tuple[tuple[str, Callable[[str], Any]], ...] = tuple(
    (f.name, _parser(f.name, f.default)) for f in fields(RunMeta)
)


IN_FLIGHT_BYTES = "bytes.in_flight"
"""Counter: estimated bytes of COMMITTED + ASSIGNED samples."""

WEIGHTS = "weights"
"""Counter: published weight versions."""

_DROP_PREFIX = "drop."


_SAMPLE_COUNTERS = {state: f"s.{state.value}" for state in SampleState}
_PROMPT_COUNTERS = {state: f"p.{state.value}" for state in PromptState}


def sample_counter(state: SampleState) -> str:
    """Counter name of the samples in ``state``."""
    return _SAMPLE_COUNTERS[state]


def prompt_counter(state: PromptState) -> str:
    """Counter name of the prompts in ``state``."""
    return _PROMPT_COUNTERS[state]


def drop_counter(reason: str) -> str:
    """Counter name of the samples dropped for ``reason``."""
    return _DROP_PREFIX + reason


def dropped_reasons(counters: dict[str, int]) -> dict[str, int]:
    """Per-reason drop counts out of all counters."""
    return {
        name[len(_DROP_PREFIX) :]: value
        for name, value in counters.items()
        if name.startswith(_DROP_PREFIX) and value
    }
