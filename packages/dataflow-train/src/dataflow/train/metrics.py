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
    """Each metric as a TensorBoard scalar tagged with its own name (the same keys as the JSONL
    rows, e.g. ``loss``, ``lr``, ``train/acc_0``) at the optimizer step; flushed every step.

    ``resumed_from``: the checkpoint step a resumed run restarts after; TensorBoard hides the
    events a crashed run logged past it (they are trained again), as the JSONL rewind does.
    """

    def __init__(self, log_dir: str | Path, *, resumed_from: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resumed_from is None else max(resumed_from, 0) + 1
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)
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


def default_metrics(log_dir: str | Path, *, resumed_from: int | None = None) -> FanOutMetrics:
    """``metrics.jsonl`` in ``log_dir``, plus TensorBoard events in ``log_dir/tensorboard`` when
    tensorboard is installed (``resumed_from``: see :class:`TensorBoardMetrics`).
    """
    sinks: list[MetricsSink] = [JsonlMetrics(Path(log_dir) / "metrics.jsonl")]
    if tensorboard_available():
        sinks.append(TensorBoardMetrics(Path(log_dir) / "tensorboard", resumed_from=resumed_from))
    return FanOutMetrics(sinks)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows a :class:`JsonlMetrics` wrote, in order."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


class MetricsProgress:
    """The metrics stream's resumable state: the last step logged and how many rows were.

    Kept on every rank (rank 0 writes the rows; the counts are the same everywhere), saved in
    each checkpoint as a DCP ``Stateful`` piece. A resumed run continues the counts, and
    ``logged_through`` says where its sinks' history ends (rows past it were trained again).
    """

    def __init__(self) -> None:
        self.logged_through = 0
        self.rows = 0

    def record(self, step: int) -> None:
        """Note that ``step``'s row was logged."""
        self.logged_through = step
        self.rows += 1

    def state_dict(self) -> dict[str, Any]:
        return {"logged_through": self.logged_through, "rows": self.rows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.logged_through = int(state["logged_through"])
        self.rows = int(state["rows"])
