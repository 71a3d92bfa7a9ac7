"""Exporting a run's draft: rebuild the objective from the run's config, load the newest
checkpoint's weights into it, write the SGLang or HF directory.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from dataflow.contracts import InvalidInputError, NotFoundError
from dataflow.launch.builders.common import trainer_objective
from dataflow.launch.config import LaunchConfig, load_config
from dataflow.launch.run_dir import RunDir
from dataflow.train.checkpoint import CheckpointInfo, CheckpointManager, CheckpointRefusedError
from dataflow.train.distributed import LocalCollective
from dataflow.train.eagle3.sequence import LocalSequence
from dataflow.train.export import FORMATS, export_draft
from dataflow.train.parallel.sequence import SequenceParallelObjective


def _checkpoint_to_export(manager: CheckpointManager, checkpoint: Path | None) -> CheckpointInfo:
    if checkpoint is not None:
        chosen = manager.resolve(checkpoint)
        manager.verify(chosen)
        return chosen
    info, refused = manager.newest_verified()
    if refused:
        # Exporting an older draft than the newest checkpoint is the user's call, not ours.
        hint = (
            f"; the newest checkpoint that verifies is {info.path}: pass --checkpoint "
            f"{info.path} to export that one"
            if info is not None
            else ""
        )
        raise CheckpointRefusedError(refused[0].file, refused[0].reason + hint)
    if info is None:
        raise NotFoundError(f"{manager.root} holds no complete checkpoint to export")
    return info


def export_from_checkpoint(
    config: LaunchConfig,
    run_dir: RunDir,
    fmt: str,
    out: Path,
    checkpoint: Path | None = None,
) -> Path:
    """Write the draft of ``run_dir``'s newest checkpoint (or of ``checkpoint``) to ``out``.

    Works for checkpoints written by any number of ranks (loaded unsharded in this process).
    The checkpoint is verified against the manifest its run signed before anything of it is
    deserialised: ``CheckpointRefusedError`` names the file otherwise (the newest checkpoint
    refused is never silently replaced by an older one: the error names the older one to pass
    as ``checkpoint``). Raises ``NotFoundError`` without a complete checkpoint,
    ``InvalidInputError`` for an unknown format or a non-empty ``out``; nothing is written then.
    """
    if fmt not in FORMATS:
        raise InvalidInputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    manager = CheckpointManager(run_dir.checkpoints, LocalCollective(), run_id=config.run.id)
    info = _checkpoint_to_export(manager, checkpoint)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(f"export target {str(out)!r} exists and is not an empty directory")
    objective = trainer_objective(config)
    # A sequence-parallel run trained the objective inside its SP wrapper; the same wrapper on
    # one process gives the checkpoint's parameter names.
    model: nn.Module = (
        SequenceParallelObjective(objective, LocalSequence())
        if config.trainer.sp_size > 1
        else objective
    )
    tensors = {"model": get_model_state_dict(model)}
    manager.load(info, tensors)
    set_model_state_dict(model, tensors["model"])
    return export_draft(objective, out, fmt=fmt)


def export_run(
    run_path: str | Path, fmt: str, out: str | Path, checkpoint: str | Path | None = None
) -> Path:
    """``export RUN_DIR``: the run's ``config.yaml`` names the target and draft shape."""
    run_dir = RunDir(Path(run_path))
    if not run_dir.config.is_file():
        raise NotFoundError(f"{run_path} is not a run directory: it has no config.yaml")
    return export_from_checkpoint(
        load_config(run_dir.config),
        run_dir,
        fmt,
        Path(out),
        Path(checkpoint) if checkpoint is not None else None,
    )
