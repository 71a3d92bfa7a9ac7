"""torch.distributed plumbing: process-group setup, the contracts' ``Collective``, failing together.

The trainer talks to its peers on two groups: the default group carries FSDP's tensor
collectives (gloo on CPU, NCCL on GPU); a separate gloo *control group* carries small CPU-side
agreements (the fail-together flags, the distributed ack's gathers). Keeping them apart means a
rank that reports an error never issues a collective that another rank's FSDP op could be
matched against.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dataflow.contracts import InvalidInputError, RunFailedError
from dataflow.control.dist_ack import SoloCollective

T = TypeVar("T")


# A single-process run takes the same ack path with the control plane's one-rank collective.
LocalCollective = SoloCollective


class TorchCollective:
    """The contracts' ``Collective`` over a torch.distributed group (the control group).

    Guarantees: every call is a real collective on ``group``; results are in rank order; objects
    travel pickled between the ranks of one job (trusted peers), never across the data plane.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise InvalidInputError("TorchCollective needs an initialised process group")
        self._group = group
        self._rank = dist.get_rank(group)
        self._world = dist.get_world_size(group)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    def all_gather_object(self, obj: T) -> list[T]:
        out: list[Any] = [None] * self._world
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def broadcast_object(self, obj: T | None, src: int = 0) -> T:
        box: list[Any] = [obj]
        dist.broadcast_object_list(box, src=src, group=self._group)
        result: T = box[0]
        return result

    def barrier(self) -> None:
        dist.barrier(group=self._group)


@dataclass(frozen=True)
class DistributedContext:
    """What :func:`init_distributed` set up for this process."""

    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh
    control_group: dist.ProcessGroup

    @property
    def collective(self) -> TorchCollective:
        """The control group as the contracts' ``Collective`` (for the distributed ack)."""
        return TorchCollective(self.control_group)


def init_distributed(timeout_s: float = 300.0, backend: str | None = None) -> DistributedContext:
    """Join the job described by the torchrun environment (``RANK``, ``WORLD_SIZE``, ``MASTER_*``).

    Picks NCCL when CUDA is available (binding ``LOCAL_RANK``'s device), else gloo; builds a
    1-D device mesh over all ranks and a gloo control group. ``timeout_s`` bounds every
    collective, so a peer that vanished mid-collective surfaces as an error, not a hang.
    """
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise InvalidInputError(f"distributed training needs the environment variables {missing}")
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    backend = backend or ("nccl" if use_cuda else "gloo")
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, timeout=timeout)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    control = dist.new_group(backend="gloo", timeout=timeout)
    assert control is not None
    return DistributedContext(dist.get_rank(), dist.get_world_size(), device, mesh, control)


def shutdown_distributed(clean: bool) -> None:
    """Leave the job: barrier first after a clean run, never after a failure.

    The barrier keeps a rank from exiting while a peer still talks to it; after a failure a
    peer may never arrive, so the groups are destroyed at once.
    """
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


class FailTogether:
    """All ranks learn at the same point whether any rank failed or ran out of data.

    ``agree(stage, error, end)`` is a collective on the control group: each rank contributes
    whether it failed and whether its data ended. If any rank failed, every rank raises — the
    failing rank re-raises its own error, the others raise :class:`RunFailedError` naming the
    failing ranks and their messages. If some ranks ran out of data and others did not, all
    raise :class:`RunFailedError`. Otherwise it returns whether all ranks ended.
    """

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self._group = group
        self._world = dist.get_world_size(group) if dist.is_initialized() else 1

    def agree(self, stage: str, error: BaseException | None, end: bool = False) -> bool:
        if self._world == 1:
            if error is not None:
                raise error
            return end
        flags = torch.tensor([int(error is not None), int(end)], dtype=torch.int64)
        try:
            dist.all_reduce(flags, group=self._group)
        except RuntimeError as exc:  # gloo/NCCL: a peer vanished or the timeout passed
            raise RunFailedError(f"lost contact with a peer rank during {stage}: {exc}") from exc
        failed, ended = int(flags[0]), int(flags[1])
        if failed:
            text = None if error is None else f"{type(error).__name__}: {error}"
            reports: list[Any] = [None] * self._world
            try:
                dist.all_gather_object(reports, text, group=self._group)
            except RuntimeError as exc:
                raise RunFailedError(
                    f"lost contact with a peer rank during {stage}: {exc}"
                ) from exc
            if error is not None:
                raise error
            detail = "; ".join(f"rank {r}: {t}" for r, t in enumerate(reports) if t is not None)
            raise RunFailedError(f"a peer rank failed during {stage}: {detail}")
        if 0 < ended < self._world:
            raise RunFailedError(
                f"{ended} of {self._world} ranks ran out of data during {stage}; "
                "every rank must get the same number of batches"
            )
        return ended == self._world
