"""Capturing a prompt set's features once into safetensors files (the offline feature set)."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm

from dataflow.launch.builders.offline_staleness import write_file_targets
from dataflow.launch.config import LaunchConfig
from dataflow.launch.data import build_tasks, load_prompts
from dataflow.launch.engines import open_engine
from dataflow.store.file import list_feature_files


def has_feature_files(directory: Path) -> bool:
    """Whether ``directory`` holds at least one feature file."""
    return directory.exists() and bool(list_feature_files(directory))


def capture_feature_files(config: LaunchConfig, directory: Path, *, progress: bool = True) -> int:
    """Run the target over every prompt once and write ``<task id>.safetensors`` per sample
    (the four EAGLE3 features) into ``directory``; return the number written. The target
    version of each written file is recorded in ``target.json`` beside them.

    Each file is written beside its final name and renamed, so a crash leaves no torn file.
    Files already present are kept (a re-run completes an interrupted capture).
    """
    directory.mkdir(parents=True, exist_ok=True)
    engine = open_engine(config.target)
    try:
        prompts = load_prompts(config.data, engine.tokenizer)  # type: ignore[attr-defined]
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
