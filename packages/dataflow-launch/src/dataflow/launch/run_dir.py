"""The run directory: where one run keeps its resolved config, records, checkpoints and draft.

Layout (``RunDir(root)``)::

    config.yaml        the resolved config (secrets redacted)
    metrics.jsonl      one JSON line per logged optimizer step (rank 0)
    tensorboard/       the same scalars as TensorBoard events (when tensorboard is installed)
    trained.jsonl      one line per optimizer step: the sample ids trained in it (audit trail)
    checkpoints/       trainer checkpoints (step-NNNNNNNN/)
    plots/             loss / accuracy / acceptance PNGs
    draft/             the exported draft (SGLang form)
    draft-vllm/        the same draft with the aux layer ids vLLM reads
    manifest.json      disaggregated offline: the refs the producer ingested
    producer.json      what the producer did (samples, tokens, seconds)
    trainer.json       what the trainer did (steps, samples, tokens, seconds, final metrics)
    plane.json         colocated online: the control plane that ran (ledger, release, store)
    staleness.json     offline with staleness on: samples passed / dropped by target
    summary.json       the end summary
    logs/              the role processes' output (demo)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataflow.contracts import CorruptRecordError, NotFoundError
from dataflow.launch.config import LaunchConfig, dump_yaml


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The JSON document at ``path``; missing → NotFoundError, unreadable → CorruptRecordError."""
    if not path.is_file():
        raise NotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CorruptRecordError(f"{path} is not valid JSON: {exc}") from None


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (see the module docstring); ``create`` makes them."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def trained(self) -> Path:
        return self.root / "trained.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def draft(self) -> Path:
        return self.root / "draft"

    @property
    def draft_vllm(self) -> Path:
        return self.root / "draft-vllm"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def producer_report(self) -> Path:
        return self.root / "producer.json"

    @property
    def trainer_report(self) -> Path:
        return self.root / "trainer.json"

    @property
    def plane_report(self) -> Path:
        return self.root / "plane.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def create(self) -> RunDir:
        """Make the directory and its sub-directories (existing ones are kept)."""
        for path in (self.root, self.checkpoints, self.plots, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        return self

    def write_config(self, config: LaunchConfig) -> None:
        """Write the resolved config as ``config.yaml`` (secrets redacted)."""
        self.create()
        tmp = self.config.with_name(".config.yaml.tmp")
        tmp.write_text(dump_yaml(config), encoding="utf-8")
        os.replace(tmp, self.config)

    def has_checkpoint(self) -> bool:
        """Whether a complete checkpoint exists (a fresh run must not silently reuse one)."""
        return any((p / "COMPLETE").is_file() for p in self.checkpoints.glob("step-*"))
