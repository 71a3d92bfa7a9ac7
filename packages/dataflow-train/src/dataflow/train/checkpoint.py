"""Atomic, rotating checkpoints written with ``torch.distributed.checkpoint``.

The checkpoint is a dict of resumable pieces (:mod:`dataflow.train.checkpoint_state`: model,
optimizer, schedule, hooks, metrics, each rank's loader position and RNG), each a DCP
``Stateful``, handed whole to ``torch.distributed.checkpoint`` (``dcp.save`` / ``dcp.load``).

Layout under ``root``::

    step-00000003/            a complete checkpoint (exists only once fully written)
        .metadata, __*.distcp  every piece (DCP: tensors sharded by rank, reshardable)
        rank-0.json ...        each rank's receipt (JSON, for people: rank, loader position)
        meta.json              shared: step, config and its fingerprint, ranks, ledger step
        COMPLETE               marker
        MANIFEST.json          signed sizes + SHA-256 of every file above, written last
    .run-key                  the run's secret that signs the manifests (mode 0600)
    .tmp-step-00000004/       a save in progress (or one a crash interrupted: ignored)

A save writes everything into the temporary directory, then rank 0 renames it into place. A
crash at any instant therefore leaves either the new checkpoint complete or only the previous
ones: a directory without ``COMPLETE`` is never read. A complete directory is loaded only
after it is verified against its manifest (:mod:`dataflow.train.checkpoint_manifest`), before
DCP unpickles anything; a refused one is reported with the file and the reason.

Trust: torch 2.13's DCP reads ``.metadata`` with ``pickle.load`` and every non-tensor value
(schedule counters, loader positions, RNG states, param groups) with
``torch.load(weights_only=False)`` — both run code an attacker put in the file; tensors are
read with ``weights_only=True``. None of it happens before :meth:`CheckpointManager.verify`
has checked every file's size and SHA-256 against the manifest signed with the run's key
(``load`` calls it first, on every rank): only bytes this run's own saves wrote are unpickled.
``meta.json`` and ``rank-<r>.json`` are plain JSON, also read only after verification.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from dataflow.contracts import Collective, CorruptRecordError, InvalidInputError, NotFoundError
from dataflow.train.checkpoint_manifest import (
    CheckpointRefusedError,
    run_key,
    verify_checkpoint,
    write_manifest,
)

__all__ = [
    "MARKER",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointRefusedError",
    "RefusedCheckpoint",
    "config_differences",
    "fingerprint",
    "report_refused",
]

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8})$")

FaultHook = Callable[[str, int], None]
"""Called as ``hook(phase, step)`` at ``"tensors_written"`` and ``"before_rename"`` (tests)."""


def fingerprint(config: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``config``: equal configs, equal fingerprints."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, child in value.items():
            out.update(_flatten(child, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable ``field: saved X, now Y`` lines for every differing (flattened) field."""
    old, new = (
        _flatten(json.loads(json.dumps(saved, default=str))),
        _flatten(json.loads(json.dumps(current, default=str))),
    )
    return [
        f"{key}: saved {old.get(key, '<absent>')!r}, now {new.get(key, '<absent>')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key, "<absent>") != new.get(key, "<absent>")
    ]


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    # DCP warns that it "assumes" a single process even when told so with no_dist=True.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint on disk."""

    step: int
    path: Path


@dataclass(frozen=True)
class RefusedCheckpoint:
    """A complete checkpoint that failed verification: which file, and why (never loaded)."""

    step: int
    path: Path
    file: Path
    reason: str


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(obj, fh, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFoundError(f"checkpoint file {path} is missing") from None
    except json.JSONDecodeError as exc:
        raise CorruptRecordError(f"checkpoint file {path} is not valid JSON: {exc}") from None


class CheckpointManager:
    """Saves and finds checkpoints under ``root``; every rank of the job calls ``save`` together.

    Guarantees: ``save`` is atomic (temporary directory, marker, rename by rank 0) and raises on
    every rank if any rank failed to write; saving step N first removes checkpoints of steps
    above N (a run resumed from an older checkpoint forks from it); only the newest
    ``keep_last`` complete checkpoints are kept (0 keeps all); ``latest`` ignores anything
    without a ``COMPLETE`` marker; ``read_shared`` and ``load`` verify the checkpoint against its
    manifest (signed with the run's key, for run ``run_id``) before reading any of it, and
    raise :class:`CheckpointRefusedError` naming the file otherwise, on every rank.
    """

    def __init__(
        self,
        root: str | Path,
        collective: Collective,
        *,
        keep_last: int = 3,
        fault_hook: FaultHook | None = None,
        run_id: str = "run",
    ) -> None:
        if keep_last < 0:
            raise InvalidInputError(f"keep_last must be >= 0, got {keep_last}")
        self.root = Path(root)
        self._collective = collective
        self._keep_last = keep_last
        self._fault_hook = fault_hook
        self.run_id = run_id
        self._verified: set[Path] = set()

    # ------------------------------------------------------------------ finding
    def complete(self) -> list[CheckpointInfo]:
        """Every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / MARKER).is_file():
                found.append(CheckpointInfo(int(match.group(1)), child))
        return sorted(found, key=lambda info: info.step)

    def latest(self) -> CheckpointInfo | None:
        """The complete checkpoint with the highest step, if any."""
        done = self.complete()
        return done[-1] if done else None

    def resolve(self, path: str | Path) -> CheckpointInfo:
        """A checkpoint given by its directory; refuses one that is not complete."""
        target = Path(path)
        match = _STEP_DIR.match(target.name)
        if not match or not (target / MARKER).is_file():
            raise NotFoundError(f"{target} is not a complete checkpoint (no {MARKER} marker)")
        return CheckpointInfo(int(match.group(1)), target)

    # ------------------------------------------------------------------- saving
    def save(
        self,
        step: int,
        state: dict[str, Any],
        rank_state: Mapping[str, Any],
        shared_state: Mapping[str, Any],
    ) -> CheckpointInfo:
        """Write ``state`` (DCP: tensors, nested dicts and ``Stateful`` pieces), this rank's
        JSON ``rank_state`` (``rank-<r>.json``) and rank 0's JSON ``shared_state``.
        """
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        self._verified.discard(final)
        rank = self._collective.rank
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self._collective.barrier()
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        error: str | None = None
        try:
            _write_json(tmp / f"rank-{rank}.json", dict(rank_state))
            if self._fault_hook is not None:
                self._fault_hook("tensors_written", step)
        except Exception as exc:  # gathered below so that every rank raises together
            error = f"rank {rank}: {type(exc).__name__}: {exc}"
        errors = [e for e in self._collective.all_gather_object(error) if e is not None]
        if errors:
            raise CorruptRecordError(f"checkpoint of step {step} was not written: {errors}")
        outcome: str | None = None
        if rank == 0:
            try:
                self._finalise(step, tmp, final, shared_state)
            except Exception as exc:  # broadcast below
                outcome = f"{type(exc).__name__}: {exc}"
        outcome = self._collective.broadcast_object(outcome, src=0)
        if outcome is not None:
            raise CorruptRecordError(f"checkpoint of step {step} was not published: {outcome}")
        return CheckpointInfo(step, final)

    def _finalise(self, step: int, tmp: Path, final: Path, shared: Mapping[str, Any]) -> None:
        _write_json(tmp / "meta.json", {**shared, "step": step})
        _write_json(tmp / MARKER, {"step": step})
        write_manifest(tmp, run_id=self.run_id, step=step, key=run_key(self.root, create=True))
        _fsync_dir(tmp)
        if self._fault_hook is not None:
            self._fault_hook("before_rename", step)
        for info in self.complete():
            if info.step >= step:
                shutil.rmtree(info.path)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        self._rotate()

    def _rotate(self) -> None:
        for child in self.root.iterdir():
            if child.name.startswith(".tmp-step-"):
                shutil.rmtree(child, ignore_errors=True)
        if self._keep_last:
            for info in self.complete()[: -self._keep_last]:
                shutil.rmtree(info.path, ignore_errors=True)

    # ------------------------------------------------------------- verification
    def verify(self, info: CheckpointInfo) -> None:
        """Verify ``info`` against its manifest (rank 0 reads, every rank gets the verdict).

        Raises :class:`CheckpointRefusedError` naming the file on every rank; nothing of the
        checkpoint is deserialised either way. Every rank calls this together.
        """
        verdict: tuple[str, str] | None = None
        if self._collective.rank == 0:
            try:
                key = run_key(self.root, create=False)
                verify_checkpoint(info.path, run_id=self.run_id, step=info.step, key=key)
            except CheckpointRefusedError as exc:
                verdict = (str(exc.path), str(exc))
            except OSError as exc:
                verdict = (str(info.path), f"checkpoint {info.path} cannot be read: {exc}")
        verdict = self._collective.broadcast_object(verdict, src=0)
        if verdict is not None:
            raise CheckpointRefusedError(Path(verdict[0]), verdict[1])
        self._verified.add(info.path)

    def newest_verified(self) -> tuple[CheckpointInfo | None, list[RefusedCheckpoint]]:
        """The newest complete checkpoint that verifies, and every newer one that did not.

        Every rank calls this together. ``(None, [])``: there is no complete checkpoint;
        ``(None, refused)``: there are some and none verifies.
        """
        refused: list[RefusedCheckpoint] = []
        for info in reversed(self.complete()):
            try:
                self.verify(info)
            except CheckpointRefusedError as exc:
                refused.append(RefusedCheckpoint(info.step, info.path, exc.path, str(exc)))
                continue
            return info, refused
        return None, refused

    def _ensure_verified(self, info: CheckpointInfo) -> None:
        if info.path not in self._verified:
            self.verify(info)

    # ------------------------------------------------------------------ loading
    def read_shared(self, info: CheckpointInfo) -> dict[str, Any]:
        """The checkpoint's ``meta.json``, once the checkpoint is verified."""
        self._ensure_verified(info)
        meta: dict[str, Any] = _read_json(info.path / "meta.json")
        return meta

    def load(self, info: CheckpointInfo, state: dict[str, Any]) -> dict[str, Any]:
        """Load ``state`` in place (DCP: tensors resharded to this job's layout, ``Stateful``
        pieces given their ``load_state_dict``), once the checkpoint is verified; return this
        rank's ``rank_state`` (``{}`` for a rank the saving job did not have). Every rank calls
        this together, with the same top-level keys.
        """
        self._ensure_verified(info)
        rank_file = info.path / f"rank-{self._collective.rank}.json"
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(info.path), no_dist=not dist.is_initialized())
        if not rank_file.is_file():
            return {}
        loaded: dict[str, Any] = _read_json(rank_file)
        return loaded


def report_refused(
    refused: Sequence[RefusedCheckpoint], chosen: CheckpointInfo | None
) -> list[str]:
    """One line per refused checkpoint saying what is loaded instead; raises when none verifies.

    ``CheckpointRefusedError`` (naming every refused file) when checkpoints were refused and
    ``chosen`` is ``None``: resuming from nothing would retrain from scratch over a run that has
    checkpoints, so the caller must decide.
    """
    if refused and chosen is None:
        raise CheckpointRefusedError(
            refused[0].file,
            "no checkpoint of this run verifies, so none is loaded: "
            + "; ".join(r.reason for r in refused),
        )
    assert chosen is not None or not refused
    return [
        f"checkpoint step {r.step} refused: {r.reason}; falling back to the verified "
        f"checkpoint of step {chosen.step if chosen is not None else -1}"
        for r in refused
    ]
