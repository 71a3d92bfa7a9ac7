"""Config-level checks that need no backend: run first by ``preflight``, before any directory,
process or file exists, so a config that cannot work fails in one line naming the setting and
the numbers (docs/architecture.md, "preflight").
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath

from dataflow.contracts import InvalidInputError
from dataflow.contracts.uris import parse_store_uri
from dataflow.launch.config import LaunchConfig

ROLES = ("run", "produce", "consume")
"""The entry points that start work; each checks its config with :func:`check_config`."""


def check_store_path(config: LaunchConfig) -> None:
    """A ``dir://`` store names an absolute directory (producer and consumer, each with its own
    working directory, must mean the same one).
    """
    parsed = parse_store_uri(config.store.uri)
    if parsed.scheme == "dir" and not PurePosixPath(parsed.location).is_absolute():
        raise InvalidInputError(
            f"store.uri {config.store.uri!r}: a dir:// store path must be absolute "
            f"(dir:///{parsed.location.lstrip('/')} or dir://$PWD/{parsed.location}), "
            "since the producer and the consumer must resolve it to the same directory"
        )


def host_rank_capacity() -> tuple[int, str]:
    """How many trainer ranks this host can run, and of what: CUDA devices when CUDA is usable
    (one rank per device), else the CPU cores this process may use.
    """
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count(), "CUDA devices"
    except ImportError:  # pragma: no cover - torch is a dependency of dataflow-launch
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    return cores, "CPU cores"


def check_ranks(config: LaunchConfig, role: str) -> None:
    """The trainer world size fits where it will start.

    ``run`` starts ``dp_size x sp_size`` ranks on this host: refused when that exceeds the
    host's CUDA devices (or CPU cores without CUDA). ``consume`` outside ``torchrun`` is one
    process: refused unless the world size is 1; under ``torchrun`` the world must match.
    """
    t = config.trainer
    ranks = t.world_size
    if role == "consume":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1 and ranks != 1:
            raise InvalidInputError(
                f"trainer.dp_size x trainer.sp_size is {t.dp_size} x {t.sp_size} = {ranks} but "
                f"this is one process; start the consumer with torchrun --nproc-per-node {ranks}"
            )
        if world != 1 and world != ranks:
            raise InvalidInputError(
                f"torchrun started {world} ranks but trainer.dp_size x trainer.sp_size is "
                f"{t.dp_size} x {t.sp_size} = {ranks}"
            )
        return
    if role != "run" or ranks <= 1:
        return
    capacity, unit = host_rank_capacity()
    if ranks > capacity:
        raise InvalidInputError(
            f"trainer.dp_size x trainer.sp_size = {t.dp_size} x {t.sp_size} = {ranks} trainer "
            f"ranks, but this host has {capacity} {unit}: lower trainer.dp_size (at most "
            f"{max(capacity // t.sp_size, 1)} with sp_size {t.sp_size}) or run the consumer under "
            "torchrun across hosts"
        )


def check_dataset_fits(config: LaunchConfig, prompts: int, source: str) -> None:
    """The data holds at least one optimizer window.

    Online, every prompt gives one sample per pass: ``prompts x data.passes`` must reach the
    quantum. Offline, each epoch cuts ``prompts // (batch_size x dp_size)`` batches per rank and
    ``data.passes`` epochs must give at least ``accumulation_steps`` of them.
    """
    t = config.trainer
    passes = config.data.passes
    shape = (
        f"trainer quantum {t.quantum} (dp_size {t.dp_size} x batch_size {t.batch_size} x "
        f"accumulation_steps {t.accumulation_steps})"
    )
    if config.topology.online:
        samples = prompts * passes
        if samples < t.quantum:
            raise InvalidInputError(
                f"{shape} is larger than the dataset: {source} gives {prompts} prompts x "
                f"{passes} passes = {samples} samples, not one optimizer window; lower "
                "trainer.batch_size/dp_size/accumulation_steps or add prompts (data.passes)"
            )
        return
    per_rank_batches = (prompts // t.batch_size) // t.dp_size
    if per_rank_batches * passes < t.accumulation_steps:
        raise InvalidInputError(
            f"{shape} is larger than the dataset: {source} gives {prompts} samples, "
            f"{per_rank_batches} batches of {t.batch_size} per rank per epoch x {passes} "
            f"passes, fewer than the {t.accumulation_steps} one optimizer step needs, so no "
            "checkpoint could be trained; lower trainer.batch_size/dp_size/accumulation_steps "
            "or add prompts"
        )


def check_config(config: LaunchConfig, role: str) -> None:
    """Every check above that needs only the config (run before touching anything)."""
    if role not in ROLES:
        raise InvalidInputError(f"unknown role {role!r}; expected one of {ROLES}")
    check_store_path(config)
    check_ranks(config, role)
