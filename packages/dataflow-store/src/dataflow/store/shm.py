"""``shm://name``: same-host, zero-copy exchange between processes through POSIX shared memory.

Each generation of a sample is one segment in ``/dev/shm`` named
``dfs~<store>~<sample id>~<generation>`` holding the safetensors layout of
:mod:`dataflow.store.layout`. ``~`` can appear in neither a store name nor a sample id, so names
never collide or escape the directory.

Guarantees:
- **Zero copy on get.** A consumer (any process, knowing only the ref) maps the producer's
  segment copy-on-write and gets tensors viewing it in place: no byte travels through a pipe or
  a socket, and a consumer writing to its tensors never changes the segment.
- **Atomic publish.** A put writes a temporary segment (owner in its name) and links it to its
  final name only when complete (``link`` refuses to overwrite), so a reader sees a whole
  generation or none.
- **Unlink on free.** release (last lease) and abort unlink the segment; mappings already
  handed out stay valid until their tensors are dropped.
- **Dead producers are reclaimed.** Each segment records its owner (pid + kernel start time, so
  pid reuse is harmless, + pid namespace: owners in another container are never judged dead). ``gc()`` in any process unlinks segments and temporaries of this store
  whose owner died without closing, unless this process holds a lease on them. ``close()``
  detaches its segments instead: they outlive a producer that exits cleanly and are freed by
  release, abort or age.
- Generations come from the system-wide monotonic clock, so they increase across processes.
- **Foreign writers** (:mod:`dataflow.store.staging`): a staged generation is the segment
  ``<final name>~<steward owner>.staged`` (written through a temporary named after the writer,
  linked when complete), carrying the steward as its owner; ``adopt`` links it to its final
  name. ``gc`` reclaims it like a temporary once the steward is dead; ``abort`` removes it.

Options: the common ones (:class:`~dataflow.store.base.BookkeepingStore`) and ``root`` (the
shared-memory directory, default ``/dev/shm``). Segments are created mode 0600: producer and
consumers must run as the same user.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from typing import Any

import torch

from dataflow.contracts import (
    CorruptRecordError,
    DataflowError,
    FeatureSpec,
    InvalidInputError,
    NotFoundError,
    ParsedURI,
)
from dataflow.store.base import BookkeepingStore, Generation
from dataflow.store.owner import DETACHED, current_owner, owner_alive
from dataflow.store.segments import map_sample, read_layout, read_sample, write_sample
from dataflow.store.staging import parse_steward, same_specs
from dataflow.store.tensors import PreparedSample

PREFIX = "dfs~"
MAX_STORE_NAME = 40
_OWNER_KEY = "owner"


class ShmFeatureStore(BookkeepingStore):
    """Feature store over POSIX shared memory (``shm://name``; empty name = ``default``)."""

    backend = "shm"
    shared = True
    staging = True

    def __init__(self, parsed: ParsedURI, *, root: str = "/dev/shm", **options: Any) -> None:
        name = parsed.location or "default"
        if len(name) > MAX_STORE_NAME:
            raise InvalidInputError(
                f"shm store name {name!r} is {len(name)} characters; the limit is "
                f"{MAX_STORE_NAME} (segment names must fit in 255 bytes)"
            )
        if not os.path.isdir(root):
            raise InvalidInputError(f"shm root {root!r} is not a directory")
        super().__init__(parsed, **options)
        self._name = name
        self._root = root
        self._owner = current_owner()
        self._mine: set[tuple[str, int]] = set()

    # ------------------------------------------------------------------ names

    def _stem(self, sample_id: str) -> str:
        return f"{PREFIX}{self._name}~{sample_id}~"

    def _path(self, sample_id: str, generation: int) -> str:
        return os.path.join(self._root, f"{self._stem(sample_id)}{generation}")

    def _where(self, sample_id: str, generation: int) -> str:
        return f"{self.uri}: sample {sample_id!r} generation {generation}"

    def _listing(self) -> list[tuple[str, str, int, str | None]]:
        """(file name, sample id, generation, owner of a temporary or None) of this store."""
        prefix = f"{PREFIX}{self._name}~"
        out: list[tuple[str, str, int, str | None]] = []
        for entry in os.listdir(self._root):
            if not entry.startswith(prefix):
                continue
            parts = entry[len(prefix) :].split("~")
            try:
                if len(parts) == 2:
                    out.append((entry, parts[0], int(parts[1]), None))
                elif len(parts) == 3 and parts[2].endswith((".tmp", ".staged")):
                    owner = parts[2].removesuffix(".tmp").removesuffix(".staged")
                    out.append((entry, parts[0], int(parts[1]), owner))
            except ValueError:
                continue  # not ours
        return out

    # ------------------------------------------------------------------ hooks

    def _next_generation(self, sample_id: str) -> int:
        # The clock orders puts of different processes; the listing guards against a clock
        # that differs between processes (time namespaces) while a generation still exists.
        existing = self._generations(sample_id)
        self._last_generation = max(
            time.monotonic_ns(), self._last_generation + 1, existing[-1] + 1 if existing else 0
        )
        return self._last_generation

    def _write(self, sample_id: str, generation: int, sample: PreparedSample) -> None:
        final = self._path(sample_id, generation)
        temp = f"{final}~{self._owner}.tmp"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                write_sample(
                    fd,
                    sample,
                    {_OWNER_KEY: self._owner, "sample_id": sample_id},
                    self._where(sample_id, generation),
                )
            finally:
                os.close(fd)
            os.link(temp, final)  # never overwrites: a name, once published, is one generation
        except BaseException:
            _unlink(temp)
            raise
        _unlink(temp)
        with self._lock:
            self._mine.add((sample_id, generation))

    # ------------------------------------------------------------------ staging

    def _staged_path(self, sample_id: str, generation: int, owner: str | None = None) -> str:
        return f"{self._path(sample_id, generation)}~{owner or self._owner}.staged"

    def _write_staged(
        self, sample_id: str, generation: int, sample: PreparedSample, steward: str
    ) -> None:
        _, owner = parse_steward(steward)
        staged = self._staged_path(sample_id, generation, owner)
        temp = f"{self._path(sample_id, generation)}~{self._owner}.tmp"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                write_sample(
                    fd,
                    sample,
                    {_OWNER_KEY: owner, "sample_id": sample_id},
                    self._where(sample_id, generation),
                )
            finally:
                os.close(fd)
            try:
                os.link(temp, staged)
            except FileExistsError:
                raise CorruptRecordError(
                    f"{self._where(sample_id, generation)} is already staged; refusing to "
                    "overwrite it (reserve a new generation)"
                ) from None
        finally:
            _unlink(temp)

    def _check_staged(
        self, sample_id: str, generation: int, specs: Mapping[str, FeatureSpec]
    ) -> None:
        where = f"{self._where(sample_id, generation)} (staged)"
        try:
            layout = read_layout(self._staged_path(sample_id, generation), where)
        except NotFoundError:
            raise NotFoundError(
                f"{where}: nothing is staged there (wrong generation or sample, never written, "
                "already adopted or aborted)"
            ) from None
        same_specs(layout.entries, specs, where)

    def _read_staged(
        self, sample_id: str, generation: int, wanted: Mapping[str, FeatureSpec]
    ) -> dict[str, torch.Tensor]:
        where = f"{self._where(sample_id, generation)} (staged)"
        tensors, _ = read_sample(self._staged_path(sample_id, generation), wanted, where)
        return tensors

    def _promote(self, sample_id: str, generation: int, specs: Mapping[str, FeatureSpec]) -> None:
        staged = self._staged_path(sample_id, generation)
        try:
            os.link(staged, self._path(sample_id, generation))
        except FileExistsError:
            raise CorruptRecordError(
                f"{self._where(sample_id, generation)} is already stored; not adopting twice"
            ) from None
        except FileNotFoundError:
            raise NotFoundError(
                f"{self._where(sample_id, generation)}: the staged sample vanished (aborted?)"
            ) from None
        _unlink(staged)
        with self._lock:
            self._mine.add((sample_id, generation))

    def _drop_staged(self, sample_id: str, generation: int | None = None) -> None:
        for entry, sid, gen, owner in self._listing():
            staged = sid == sample_id and owner is not None and entry.endswith(".staged")
            if staged and (generation is None or gen == generation):
                _unlink(os.path.join(self._root, entry))

    # ------------------------------------------------------------------ bytes

    def _read(
        self, sample_id: str, generation: int, wanted: Mapping[str, FeatureSpec]
    ) -> dict[str, torch.Tensor]:
        tensors, _ = map_sample(
            self._path(sample_id, generation), wanted, self._where(sample_id, generation)
        )
        return tensors

    def _delete(self, stored: Generation) -> None:
        _unlink(self._path(stored.sample_id, stored.generation))
        with self._lock:
            self._mine.discard((stored.sample_id, stored.generation))

    def _exists(self, sample_id: str, generation: int) -> bool:
        return os.path.exists(self._path(sample_id, generation))

    def _generations(self, sample_id: str) -> list[int]:
        return sorted(g for _, sid, g, tmp in self._listing() if sid == sample_id and tmp is None)

    def _reclaim_orphans(self) -> tuple[int, int]:
        freed = freed_bytes = 0
        for entry, sid, generation, temp_owner in self._listing():
            with self._lock:
                if self._lease_counts[(sid, generation)]:
                    continue
            path = os.path.join(self._root, entry)
            owner = temp_owner if temp_owner is not None else self._owner_of(path, sid, generation)
            if owner is None or owner_alive(owner):
                continue
            try:
                size = os.stat(path, follow_symlinks=False).st_size
                os.unlink(path)
            except FileNotFoundError:
                continue  # another process reclaimed it first
            with self._lock:
                stale = self._resident.get(sid)
                if stale is not None and stale.generation == generation:
                    self._forget(stale)
                else:
                    self._tombstone(sid, generation)
            freed += temp_owner is None
            freed_bytes += size
        return freed, freed_bytes

    def _owner_of(self, path: str, sample_id: str, generation: int) -> str | None:
        try:
            return read_layout(path, self._where(sample_id, generation)).metadata.get(_OWNER_KEY)
        except (CorruptRecordError, OSError):
            return None  # not a segment we wrote (or not a file at all): leave it alone
        except DataflowError:
            return None  # vanished meanwhile

    def _close_backend(self) -> None:
        # A clean exit hands the segments over: they outlive this process (see module docs).
        with self._lock:
            mine = sorted(self._mine)
            self._mine.clear()
        for sample_id, generation in mine:
            _detach(self._path(sample_id, generation), self._owner)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _detach(path: str, owner: str) -> None:
    """Overwrite the owner in a segment's header with :data:`DETACHED` (same width, in place)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return  # already freed
    try:
        head = os.pread(fd, 4096, 0)
        at = head.find(f'"{_OWNER_KEY}":"{owner}"'.encode())
        if at >= 0:
            os.pwrite(fd, DETACHED.encode(), at + len(_OWNER_KEY) + 4)
    finally:
        os.close(fd)
