"""``trained.jsonl``: the exactly-once audit trail, one line per optimizer step.

A line ``{"step": s, "sample_ids": [...]}`` is appended (and fsynced) only after the ack of
step ``s`` committed, so every line names samples the ledger records as trained at ``s``.

Resume: a crash can leave lines for steps after the checkpoint the run resumes from (acked,
then lost with the process before the next checkpoint). Reconciliation returns those samples
to the backlog and they are trained again, so :meth:`TrainedLog.rewind` drops every line after
the restored checkpoint step (and a torn last line) before training continues. After a
complete run each sample appears in exactly one line (per epoch for offline runs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dataflow.contracts import CorruptRecordError


@dataclass(frozen=True)
class TrainedStep:
    """One line of the log."""

    step: int
    sample_ids: tuple[str, ...]


class TrainedLog:
    """Appends and rewinds ``trained.jsonl`` (see the module docstring). Rank 0 only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, step: int, sample_ids: Sequence[str]) -> None:
        """Record that ``step`` trained ``sample_ids`` (call after the ack committed)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"step": step, "sample_ids": list(sample_ids)}) + "\n"
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[TrainedStep]:
        """Every complete line, in order (a torn last line from a crash is skipped)."""
        if not self.path.is_file():
            return []
        steps: list[TrainedStep] = []
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        for number, line in enumerate(lines, 1):
            if not line.endswith("\n"):
                break  # torn by a crash mid-write: never acknowledged as written
            try:
                row = json.loads(line)
                steps.append(TrainedStep(int(row["step"]), tuple(row["sample_ids"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise CorruptRecordError(
                    f"{self.path}:{number}: not a trained-step line ({exc})"
                ) from None
        return steps

    def rewind(self, step: int) -> int:
        """Keep only lines for steps ``<= step`` (atomically); return how many were dropped."""
        if not self.path.is_file():
            return 0
        rows = self.read()
        raw_lines = len(self.path.read_text(encoding="utf-8").splitlines())
        kept = [r for r in rows if r.step <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for row in kept:
                fh.write(json.dumps({"step": row.step, "sample_ids": list(row.sample_ids)}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        return raw_lines - len(kept)

    def sample_ids(self) -> list[str]:
        """Every trained sample id, in log order (duplicates kept: the audit looks for them)."""
        return [sid for row in self.read() for sid in row.sample_ids]


def rewind_jsonl(path: Path, step: int) -> None:
    """Drop lines of a ``{"step": ...}`` JSONL file (e.g. metrics) for steps after ``step``."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
