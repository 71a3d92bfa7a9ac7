"""``dir:///path``: a directory shared by processes, possibly on different hosts.

Layout of the root::

    .dataflow-store.json         marker: format version, salted token digest (or none)
    .generation                  the store-wide generation counter (flock-protected)
    <sample id>/<gen>.safetensors   one file per generation (safetensors layout)
    .tmp~<host>~<owner>~<sample id>~<gen>   a write in progress
    .staged~<host>~<owner>~<sample id>~<gen>   a foreign writer's sample, awaiting adoption by
                                           its steward (host, owner); see dataflow.store.staging

One directory per sample keeps every per-sample operation (finding a sample's generations on
put, get and abort) independent of how many samples the store holds.

Guarantees:
- **Atomic publish.** A put writes a temporary file, fsyncs it, renames it to its final name and
  fsyncs the directory: a reader on any host sees a whole generation or none. Each generation is
  its own file, so a stale ref can never read newer bytes.
- **Generations** come from one counter file under an exclusive ``flock``, so they increase
  across every process sharing the root (never reused, even after a sample is freed).
- **Auth.** A root created with ``token=...`` records a salted digest of it; opening it, and then
  every operation, requires the same token (compared with ``hmac.compare_digest``), so a token
  rotated on disk locks out old clients at their next call. See :mod:`dataflow.store.auth`.
- **No escape.** Sample ids are validated (no separators, no ``..``), every path is checked to
  sit in the root, a sample directory that is a symlink is refused, and files are opened with
  ``O_NOFOLLOW``.
- **Reads copy once** into private memory (the file may be deleted by another host right after).
- ``gc()`` also removes temporaries of writers on this host that died mid-write, staged samples
  whose steward on this host died before adopting them, and empty sample directories.

Options: the common ones, plus ``token`` (str or None), ``fsync`` (default True; False trades
crash durability for speed, e.g. on tmpfs) and ``create`` (default True: create a missing root).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import stat
from collections.abc import Mapping
from typing import Any

import torch

from dataflow.contracts import CorruptRecordError, FeatureSpec, InvalidInputError, NotFoundError
from dataflow.contracts.uris import ParsedURI
from dataflow.store.auth import TokenPolicy, check_token, check_token_shape, policy_for
from dataflow.store.base import BookkeepingStore, Generation
from dataflow.store.owner import current_owner, owner_alive
from dataflow.store.segments import read_sample, write_sample
from dataflow.store.staging import check_staged_file, parse_steward, read_staged_file
from dataflow.store.tensors import PreparedSample

MARKER = ".dataflow-store.json"
COUNTER = ".generation"
SUFFIX = ".safetensors"
FORMAT = 1


class SharedDirFeatureStore(BookkeepingStore):
    """Feature store in a shared directory (``dir:///abs/path``)."""

    backend = "dir"
    shared = True
    staging = True

    def __init__(
        self,
        parsed: ParsedURI,
        *,
        token: str | None = None,
        fsync: bool = True,
        create: bool = True,
        **options: Any,
    ) -> None:
        if not os.path.isabs(parsed.location):
            raise InvalidInputError(
                f"dir store path {parsed.location!r} must be absolute, e.g. dir:///srv/features"
            )
        if token is not None:
            check_token_shape(token)  # before anything is created
        root = os.path.realpath(parsed.location)
        if not os.path.isdir(root):
            if not create:
                raise NotFoundError(f"dir store root {root!r} does not exist (create=False)")
            os.makedirs(root, mode=0o700, exist_ok=True)
        super().__init__(parsed, **options)
        self._root = root
        self._token = token
        self._fsync = fsync
        self._host = socket.gethostname().replace("~", "_")
        self._owner = current_owner()
        self._policy = _load_or_create_marker(root, token)
        check_token(self._policy, token, self.uri)

    # ------------------------------------------------------------------ names

    def _sample_dir(self, sample_id: str) -> str:
        path = os.path.join(self._root, sample_id)
        if os.path.dirname(os.path.normpath(path)) != self._root:  # defence in depth
            raise InvalidInputError(f"sample id {sample_id!r} would leave the store root")
        return path

    def _path(self, sample_id: str, generation: int) -> str:
        return os.path.join(self._sample_dir(sample_id), f"{generation}{SUFFIX}")

    def _checked_path(self, sample_id: str, generation: int) -> str:
        """The path of a generation whose sample directory is verified not to be a symlink."""
        directory = self._sample_dir(sample_id)
        try:
            mode = os.lstat(directory).st_mode
        except FileNotFoundError:
            mode = stat.S_IFDIR  # the file open reports it missing
        if not stat.S_ISDIR(mode):
            raise CorruptRecordError(
                f"{self._where(sample_id, generation)}: {directory} is not a plain directory "
                "(a symlink?); refusing to follow it"
            )
        return os.path.join(directory, f"{generation}{SUFFIX}")

    def _where(self, sample_id: str, generation: int) -> str:
        return f"{self.uri}: sample {sample_id!r} generation {generation}"

    # ------------------------------------------------------------------ hooks

    def _check_access(self) -> None:
        policy = _read_marker(self._root)
        check_token(policy, self._token, self.uri)

    def _next_generation(self, sample_id: str) -> int:
        fd = os.open(
            os.path.join(self._root, COUNTER), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 32, 0)
            current = int(raw.decode().strip() or 0) if raw else 0
            generation = max(current, self._last_generation) + 1
            os.pwrite(fd, f"{generation:020d}\n".encode(), 0)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock
        self._last_generation = generation
        return generation

    # ------------------------------------------------------------------ staging

    def _staged_path(self, sample_id: str, generation: int, host: str, owner: str) -> str:
        self._sample_dir(sample_id)  # the id is checked to stay in the root
        return os.path.join(self._root, f".staged~{host}~{owner}~{sample_id}~{generation}")

    def _own_staged(self, sample_id: str, generation: int) -> str:
        return self._staged_path(sample_id, generation, self._host, self._owner)

    def _write_staged(
        self, sample_id: str, generation: int, sample: PreparedSample, steward: str
    ) -> None:
        host, owner = parse_steward(steward)
        staged = self._staged_path(sample_id, generation, host, owner)
        self._write_file(sample_id, generation, sample, staged)

    def _check_staged(
        self, sample_id: str, generation: int, specs: Mapping[str, FeatureSpec]
    ) -> None:
        check_staged_file(
            self._own_staged(sample_id, generation), specs, self._where(sample_id, generation)
        )

    def _read_staged(
        self, sample_id: str, generation: int, wanted: Mapping[str, FeatureSpec]
    ) -> dict[str, torch.Tensor]:
        return read_staged_file(
            self._own_staged(sample_id, generation), wanted, self._where(sample_id, generation)
        )

    def _promote(self, sample_id: str, generation: int, specs: Mapping[str, FeatureSpec]) -> None:
        final = self._path(sample_id, generation)
        if os.path.exists(final):
            raise CorruptRecordError(
                f"{self._where(sample_id, generation)} is already stored; not adopting twice"
            )
        try:
            self._move_into_place(self._own_staged(sample_id, generation), sample_id, final)
        except FileNotFoundError:
            raise NotFoundError(
                f"{self._where(sample_id, generation)}: the staged sample vanished (aborted?)"
            ) from None
        if self._fsync:
            _fsync_dir(os.path.dirname(final))
            _fsync_dir(self._root)

    def _drop_staged(self, sample_id: str, generation: int | None = None) -> None:
        for entry in os.listdir(self._root):
            parts = entry.split("~")
            if len(parts) == 5 and parts[0] == ".staged" and parts[3] == sample_id:
                if generation is not None and parts[4] != str(generation):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self._root, entry))

    # ------------------------------------------------------------------ bytes

    def _write(self, sample_id: str, generation: int, sample: PreparedSample) -> None:
        self._write_file(sample_id, generation, sample, self._path(sample_id, generation))

    def _write_file(
        self, sample_id: str, generation: int, sample: PreparedSample, final: str
    ) -> None:
        temp = os.path.join(self._root, f".tmp~{self._host}~{self._owner}~{sample_id}~{generation}")
        fd = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            try:
                write_sample(
                    fd,
                    sample,
                    {"sample_id": sample_id, "generation": str(generation)},
                    self._where(sample_id, generation),
                )
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._move_into_place(temp, sample_id, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        if self._fsync:
            _fsync_dir(os.path.dirname(final))
            _fsync_dir(self._root)

    def _move_into_place(self, temp: str, sample_id: str, final: str) -> None:
        # Another process may remove the (empty) sample directory between our mkdir and our
        # rename; the rename then fails with ENOENT and we make the directory again.
        for _ in range(8):
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.dirname(final), 0o700)
            self._checked_path(sample_id, 0)
            try:
                # link + unlink, not rename: a rename would replace a file already there (a
                # generation staged twice), a link refuses it atomically.
                os.link(temp, final)
                os.unlink(temp)
                return
            except FileExistsError:
                raise CorruptRecordError(
                    f"{self._uri}: {final} already exists; refusing to write over it"
                ) from None
            except FileNotFoundError:
                if not os.path.exists(temp):
                    raise
        raise OSError(f"{final}: its directory kept disappearing; giving up")

    def _read(
        self, sample_id: str, generation: int, wanted: Mapping[str, FeatureSpec]
    ) -> dict[str, torch.Tensor]:
        tensors, _ = read_sample(
            self._checked_path(sample_id, generation), wanted, self._where(sample_id, generation)
        )
        return tensors

    def _delete(self, stored: Generation) -> None:
        path = self._checked_path(stored.sample_id, stored.generation)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        with contextlib.suppress(OSError):  # not empty (another generation) or already gone
            os.rmdir(os.path.dirname(path))

    def _exists(self, sample_id: str, generation: int) -> bool:
        return os.path.exists(self._path(sample_id, generation))

    def _generations(self, sample_id: str) -> list[int]:
        try:
            entries = os.listdir(self._sample_dir(sample_id))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for entry in entries:
            if entry.endswith(SUFFIX):
                with contextlib.suppress(ValueError):
                    out.append(int(entry[: -len(SUFFIX)]))
        return sorted(out)

    def _reclaim_orphans(self) -> tuple[int, int]:
        freed_bytes = 0
        for entry in os.listdir(self._root):
            if not entry.startswith("."):
                with contextlib.suppress(OSError):  # only an empty sample directory goes
                    os.rmdir(os.path.join(self._root, entry))
                continue
            parts = entry.split("~")
            if len(parts) != 5 or parts[0] not in (".tmp", ".staged") or parts[1] != self._host:
                continue  # not a temporary, or another host's: its owner cannot be checked here
            if owner_alive(parts[2]):
                continue
            path = os.path.join(self._root, entry)
            try:
                freed_bytes += os.stat(path, follow_symlinks=False).st_size
                os.unlink(path)
            except FileNotFoundError:
                continue
        return 0, freed_bytes


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_marker(root: str) -> TokenPolicy:
    path = os.path.join(root, MARKER)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFoundError(
            f"{root} is no longer a dataflow store: its marker {MARKER} is gone"
        ) from None
    with os.fdopen(fd, "rb") as f:
        raw = f.read(65536)
    try:
        body = json.loads(raw)
        if body.get("format") != FORMAT:
            raise ValueError(f"format {body.get('format')!r}, expected {FORMAT}")
        return TokenPolicy(str(body.get("salt", "")), body.get("token_sha256"))
    except (ValueError, AttributeError) as exc:
        raise CorruptRecordError(f"{path} is not a valid store marker ({exc})") from None


def _load_or_create_marker(root: str, token: str | None) -> TokenPolicy:
    """Read the root's marker, or create it (first opener decides the token policy)."""
    path = os.path.join(root, MARKER)
    if not os.path.lexists(path):
        if os.listdir(root):
            raise InvalidInputError(
                f"{root} is not empty and is not a dataflow store (no {MARKER}); "
                "refusing to take it over: use an empty or new directory"
            )
        policy = policy_for(token)
        body = {"format": FORMAT, "salt": policy.salt, "token_sha256": policy.digest}
        temp = f"{path}.{os.getpid()}.tmp"
        with open(temp, "w", encoding="utf-8") as f:
            json.dump(body, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temp, path)  # fails if another process created it first: theirs wins
        except FileExistsError:
            pass
        finally:
            os.unlink(temp)
    return _read_marker(root)
