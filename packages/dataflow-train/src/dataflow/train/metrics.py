"""Where per-step metrics go: JSON lines (always), TensorBoard (when installed).

Sinks run on rank 0 only; the trainer has already reduced every metric over the ranks.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol


class MetricsSink(Protocol):
    """Receives one mapping of scalar metrics per logged optimizer step."""

    def write(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlMetrics:
    """Appends ``{"step": n, ...metrics}`` as one JSON line per call, flushed at once.

    Non-finite values are written as strings (``"nan"``, ``"inf"``) so every line stays valid
    JSON; appending to an existing file continues it (a resumed run adds its steps).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        row: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            row[key] = value if math.isfinite(value) else str(value)
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardMetrics:
    """Scalars under ``train/<name>`` in a TensorBoard event directory."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(f"train/{key}", value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class FanOutMetrics:
    """Writes every step to each sink; closes them all even if one fails."""

    def __init__(self, sinks: Sequence[MetricsSink]) -> None:
        self._sinks = list(sinks)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        for sink in self._sinks:
            sink.write(step, metrics)

    def close(self) -> None:
        errors: list[BaseException] = []
        for sink in self._sinks:
            try:
                sink.close()
            except Exception as exc:  # close the others first, then report
                errors.append(exc)
        if errors:
            raise errors[0]


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package is installed (the writer needs it)."""
    return importlib.util.find_spec("tensorboard") is not None


def default_metrics(log_dir: str | Path) -> FanOutMetrics:
    """``metrics.jsonl`` in ``log_dir``, plus TensorBoard events there when it is installed."""
    sinks: list[MetricsSink] = [JsonlMetrics(Path(log_dir) / "metrics.jsonl")]
    if tensorboard_available():
        sinks.append(TensorBoardMetrics(Path(log_dir) / "tensorboard"))
    return FanOutMetrics(sinks)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows a :class:`JsonlMetrics` wrote, in order."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
