"""Capturing a prompt set's features once into safetensors files (the offline feature set)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from tqdm import tqdm

from dataflow.contracts import InvalidInputError
from dataflow.launch.builders.offline_staleness import write_file_targets
from dataflow.launch.config import LaunchConfig
from dataflow.launch.data import build_tasks, load_prompts
from dataflow.launch.producer import engine_regeneration, open_run_engine, regenerate_tokens
from dataflow.store.file import list_feature_files


def has_feature_files(directory: Path) -> bool:
    """Whether ``directory`` holds at least one feature file."""
    return directory.exists() and bool(list_feature_files(directory))


CAPTURE_RECORD = "capture.json"
"""Beside the feature files: how they were captured (``{"regeneration": null | {...}}``)."""


def _capture_record(config: LaunchConfig) -> dict[str, Any]:
    regeneration = engine_regeneration(config)
    return {"regeneration": None if regeneration is None else asdict(regeneration)}


def check_precomputed(config: LaunchConfig, directory: Path) -> None:
    """With ``producer.regenerate``, refuse a feature directory that already holds features
    not captured with this very regeneration (pre-computed data, or an earlier capture with
    other settings): its responses were written by someone else, and training would silently
    ignore the setting. Changes nothing.
    """
    if not config.producer.regenerate or not has_feature_files(directory):
        return
    record = directory / CAPTURE_RECORD
    try:
        found = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        found = None
    if found != _capture_record(config):
        raise InvalidInputError(
            f"producer.regenerate: {directory} already holds pre-computed features that the "
            "target did not write with these regeneration settings, so regeneration cannot "
            "apply to them; point store.uri at an empty directory or set "
            "producer.regenerate=false to train them as they are"
        )


def capture_feature_files(config: LaunchConfig, directory: Path, *, progress: bool = True) -> int:
    """Run the target over every prompt once and write ``<task id>.safetensors`` per sample
    (the four EAGLE3 features) into ``directory``; return the number written. The target
    version of each written file is recorded in ``target.json`` beside them.

    Each file is written beside its final name and renamed, so a crash leaves no torn file.
    Files already present are kept (a re-run completes an interrupted capture). With
    ``producer.regenerate`` the target writes every response; ``capture.json`` records how the
    files were captured (see :func:`check_precomputed`).
    """
    check_precomputed(config, directory)
    directory.mkdir(parents=True, exist_ok=True)
    if config.target.capture == "mooncake":
        raise InvalidInputError(
            "target.capture: mooncake writes features into the run's Mooncake store, not into "
            "feature files; capture feature files with target.capture: response"
        )
    (directory / CAPTURE_RECORD).write_text(json.dumps(_capture_record(config)), encoding="utf-8")
    engine = open_run_engine(config)
    try:
        prompts = load_prompts(
            config.data,
            engine.tokenizer,  # type: ignore[attr-defined]
            regenerate_tokens=regenerate_tokens(config),
        )
        tasks = build_tasks(
            prompts.prompts,
            run_id=config.run.id,
            passes=1,
            max_length=config.data.max_length,
            target_version=engine.info.version,
        )
        todo = [t for t in tasks if not (directory / f"{t.task_id}.safetensors").exists()]
        step = config.target.batch_size
        bar = tqdm(
            total=len(tasks),
            initial=len(tasks) - len(todo),
            desc="Capturing features",
            unit="sample",
            disable=None if progress else True,
        )
        with bar:
            for start in range(0, len(todo), step):
                written: dict[str, str] = {}
                for sample in engine.capture(todo[start : start + step]):
                    final = directory / f"{sample.task_id}.safetensors"
                    tmp = directory / f".{sample.task_id}.tmp"
                    tensors = {k: v.contiguous() for k, v in sample.tensors.items()}
                    save_file(tensors, str(tmp))
                    os.replace(tmp, final)
                    written[sample.task_id] = engine.info.version
                    bar.update(1)
                # which target captured each file: the offline staleness check reads it
                write_file_targets(directory, written)
        return len(todo)
    finally:
        engine.close()
