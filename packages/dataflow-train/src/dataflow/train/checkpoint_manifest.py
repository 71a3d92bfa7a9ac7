"""Checkpoint manifests: what a run wrote, signed, so nothing else is ever unpickled.

``torch.distributed.checkpoint`` reads a checkpoint's ``.metadata`` with pickle, so loading a
file that someone else wrote can run their code. A save therefore ends (last, before the
checkpoint directory is renamed into place) with ``MANIFEST.json``: the size and SHA-256 of
every other file of the checkpoint, the run id and the step, and an HMAC-SHA256 over all of it
keyed by the run's secret (``<checkpoints>/.run-key``, 32 random bytes, mode 0600, created by
the first save). A load first verifies the whole directory against it, reading nothing but the
manifest (JSON) and raw bytes; only then may DCP touch the files.

Refused, naming the file: no manifest, a manifest that is not this run's (another run's key,
another run id or step) or was edited, a listed file missing, an unlisted file present, a
symlink, a size or digest that differs (truncated or altered). A missing key refuses all.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataflow.contracts import CorruptRecordError

MANIFEST_FILE = "MANIFEST.json"
KEY_FILE = ".run-key"
MANIFEST_FORMAT = 1
_MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_CHUNK = 4 * 1024 * 1024


class CheckpointRefusedError(CorruptRecordError):
    """A checkpoint failed verification against its manifest; nothing of it was deserialised.

    ``path`` is the offending file (or the checkpoint directory), also named in the message.
    """

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class FileDigest:
    """One file of a checkpoint as saved: its size in bytes and its SHA-256 (hex)."""

    size: int
    sha256: str


def run_key(root: Path, *, create: bool) -> bytes:
    """The run's checkpoint-signing secret under ``root``; ``create`` makes it if absent.

    Creation is atomic and never replaces an existing key (written aside, fsynced, hard-linked
    into place). Without ``create`` a missing key raises :class:`CheckpointRefusedError`.
    """
    path = root / KEY_FILE
    if not path.exists() and create:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".run-key.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another writer won: its key is the run's
        finally:
            tmp.unlink(missing_ok=True)
    try:
        text = path.read_text(encoding="ascii").strip()
        key = bytes.fromhex(text)
    except FileNotFoundError:
        raise CheckpointRefusedError(
            path,
            f"the run's checkpoint key {path} is missing: no checkpoint under {root} can be "
            "verified, so none is loaded",
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointRefusedError(path, f"the run's checkpoint key {path} is corrupt") from None
    if len(key) < 16:
        raise CheckpointRefusedError(path, f"the run's checkpoint key {path} is too short")
    return key


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> dict[str, Path]:
    """Every file under ``directory`` but the manifest, by POSIX relative path."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        base = Path(dirpath)
        for name in [*dirnames, *filenames]:
            path = base / name
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                raise CheckpointRefusedError(
                    path, f"checkpoint file {path} is a symlink or not a regular file"
                )
        for name in filenames:
            rel = (base / name).relative_to(directory).as_posix()
            if rel != MANIFEST_FILE:
                found[rel] = base / name
    return found


def _signed_body(run_id: str, step: int, files: Mapping[str, FileDigest]) -> bytes:
    body = {
        "format": MANIFEST_FORMAT,
        "run_id": run_id,
        "step": step,
        "files": {rel: {"size": d.size, "sha256": d.sha256} for rel, d in sorted(files.items())},
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _mac(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def write_manifest(directory: Path, *, run_id: str, step: int, key: bytes) -> Path:
    """Digest every file of ``directory`` and write its signed manifest atomically.

    Call it after every other file of the checkpoint is written and closed: files written
    later are not covered and make the checkpoint fail verification.
    """
    files = {
        rel: FileDigest(path.stat().st_size, _sha256(path))
        for rel, path in _files(directory).items()
    }
    body = _signed_body(run_id, step, files)
    document = {**json.loads(body), "hmac": _mac(key, body)}
    final = directory / MANIFEST_FILE
    tmp = directory / f".{MANIFEST_FILE}.tmp"
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(document, fh, sort_keys=True, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_FILE
    if path.is_symlink():
        raise CheckpointRefusedError(path, f"checkpoint manifest {path} is a symlink")
    if not path.is_file():
        raise CheckpointRefusedError(
            path,
            f"checkpoint {directory} has no manifest ({path} is missing): it was not written "
            "by a save of this run that finished, so it is not loaded",
        )
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise CheckpointRefusedError(path, f"checkpoint manifest {path} is implausibly large")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointRefusedError(
            path, f"checkpoint manifest {path} is not valid JSON: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointRefusedError(path, f"checkpoint manifest {path} is not a JSON object")
    return data


def _parse_files(path: Path, raw: Any) -> dict[str, FileDigest]:
    if not isinstance(raw, dict):
        raise CheckpointRefusedError(path, f"checkpoint manifest {path} has no file list")
    files = {}
    for rel, entry in raw.items():
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
        )
        if not ok:
            raise CheckpointRefusedError(path, f"checkpoint manifest {path}: bad entry {rel!r}")
        files[str(rel)] = FileDigest(entry["size"], entry["sha256"])
    return files


def verify_checkpoint(directory: Path, *, run_id: str, step: int, key: bytes) -> None:
    """Raise :class:`CheckpointRefusedError` naming the file unless ``directory`` is exactly
    what this run saved at ``step`` (see the module docstring). Reads only bytes and JSON.
    """
    data = _read_manifest(directory)
    path = directory / MANIFEST_FILE
    files = _parse_files(path, data.get("files"))
    claimed_run, claimed_step = data.get("run_id"), data.get("step")
    if not isinstance(claimed_run, str) or not isinstance(claimed_step, int):
        raise CheckpointRefusedError(path, f"checkpoint manifest {path} lacks run_id or step")
    body = _signed_body(claimed_run, claimed_step, files)
    if data.get("format") != MANIFEST_FORMAT or not hmac.compare_digest(
        str(data.get("hmac", "")), _mac(key, body)
    ):
        raise CheckpointRefusedError(
            path,
            f"checkpoint manifest {path} is not signed with this run's key: the checkpoint "
            "was written by another run, or the manifest was altered",
        )
    if claimed_run != run_id or claimed_step != step:
        raise CheckpointRefusedError(
            path,
            f"checkpoint manifest {path} is of run {claimed_run!r} step {claimed_step}, "
            f"not of run {run_id!r} step {step}",
        )
    present = _files(directory)
    missing = sorted(set(files) - set(present))
    if missing:
        gone = directory / missing[0]
        raise CheckpointRefusedError(gone, f"checkpoint file {gone} is missing (listed in {path})")
    extra = sorted(set(present) - set(files))
    if extra:
        raise CheckpointRefusedError(
            present[extra[0]], f"checkpoint file {present[extra[0]]} is not listed in {path}"
        )
    for rel, expected in sorted(files.items()):
        size = present[rel].stat().st_size
        if size != expected.size:
            raise CheckpointRefusedError(
                present[rel],
                f"checkpoint file {present[rel]} is {size} bytes, its manifest says "
                f"{expected.size}: truncated or altered",
            )
    for rel, expected in sorted(files.items()):
        if not hmac.compare_digest(_sha256(present[rel]), expected.sha256):
            raise CheckpointRefusedError(
                present[rel],
                f"checkpoint file {present[rel]} does not match its SHA-256 in {path}: altered",
            )
