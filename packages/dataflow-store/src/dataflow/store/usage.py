"""What a ``shm://`` store holds in ``/dev/shm`` right now, read from outside any store process.

:func:`shm_usage` lists the store's files and reads its arena's slab table (under a shared
``flock``, so the snapshot is one the table really had). It opens no store, attaches to nothing
and takes no range lock, so it never keeps an arena alive nor blocks a reader's pin; a status
tool or a test gate can call it while a run is in flight.

Accounting: a sample in flight is a published segment or a ``LIVE`` arena run; bytes in use are
the segments' sizes plus the sample bytes of the arena's ``LIVE``, ``WRITING`` and ``STAGED``
runs (a staged run counts as a staged segment file does; not the
arena file's size, which is fixed when it is created, nor the slab rounding).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass

import numpy as np

from dataflow.contracts import CorruptRecordError
from dataflow.store.arena_format import GEOMETRY, LIVE, MAGIC, RECORD, STAGED, WRITING, id_hash

_PREFIX = "dfs~"  # dataflow.store.shm.PREFIX (shm imports this module's users, not the reverse)
_ARENA = "arena"


@dataclass(frozen=True)
class ArenaRun:
    """One run in use: ``LIVE`` (published), ``WRITING`` (a put in progress or torn) or
    ``STAGED`` (a foreign writer's sample not yet adopted).
    """

    state: str
    start: int
    span: int
    generation: int
    idhash: int
    owner: str
    offset: int  # byte offset of the run in the arena file
    nbytes: int  # the sample's bytes (its safetensors layout)

    def holds(self, sample_id: str) -> bool:
        """Whether this run is tagged with ``sample_id`` (by its 64-bit hash)."""
        return self.idhash == id_hash(sample_id)


@dataclass(frozen=True)
class ShmUsage:
    """A snapshot of one store's ``/dev/shm`` files and arena table."""

    store: str
    files: tuple[str, ...]  # every dfs~<store>~* name: segments, temporaries, staged, the arena
    segments: int  # published per-sample segments
    segment_bytes: int  # sizes of every file but the arena (segments, temporaries, staged)
    arena_file_bytes: int  # the arena file's size (0: there is no arena)
    arena_allocated_bytes: int  # memory /dev/shm holds for the arena file (slabs ever used)
    slab_bytes: int
    slabs: int
    runs: tuple[ArenaRun, ...]

    @property
    def arena_runs(self) -> int:
        """``LIVE`` arena runs (samples in flight in the arena)."""
        return sum(r.state == "LIVE" for r in self.runs)

    @property
    def arena_bytes(self) -> int:
        """Sample bytes of the arena's runs in use (``LIVE``, ``WRITING``, ``STAGED``)."""
        return sum(r.nbytes for r in self.runs)

    @property
    def samples(self) -> int:
        """Samples in flight: published segments plus ``LIVE`` arena runs."""
        return self.segments + self.arena_runs

    @property
    def bytes_in_use(self) -> int:
        """Bytes in use: segment files plus the arena's runs in use (see the module docs)."""
        return self.segment_bytes + self.arena_bytes

    @property
    def empty(self) -> bool:
        """Nothing of the store is left: no file at all (the arena file included)."""
        return not self.files


def shm_usage(store_name: str, root: str = "/dev/shm") -> ShmUsage:
    """Read the usage of ``shm://<store_name>`` under ``root`` (see the module docstring).

    Raises CorruptRecordError when the arena file is not an arena of this version.
    """
    prefix = f"{_PREFIX}{store_name}~"
    files: list[str] = []
    segments = segment_bytes = 0
    for entry in sorted(os.listdir(root)):
        if not entry.startswith(prefix):
            continue
        files.append(entry)
        rest = entry[len(prefix) :]
        if rest == _ARENA:
            continue
        with contextlib.suppress(FileNotFoundError):
            segment_bytes += os.stat(os.path.join(root, entry), follow_symlinks=False).st_size
        parts = rest.split("~")
        segments += len(parts) == 2 and parts[1].isdigit()
    file_bytes, allocated, slab, nslabs, runs = _read_arena(os.path.join(root, prefix + _ARENA))
    return ShmUsage(
        store=store_name,
        files=tuple(files),
        segments=segments,
        segment_bytes=segment_bytes,
        arena_file_bytes=file_bytes,
        arena_allocated_bytes=allocated,
        slab_bytes=slab,
        slabs=nslabs,
        runs=runs,
    )


def _read_arena(path: str) -> tuple[int, int, int, int, tuple[ArenaRun, ...]]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0, 0, 0, 0, ()
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # writers change the table under LOCK_EX
        st = os.fstat(fd)
        head = os.pread(fd, GEOMETRY.size, 0)
        if len(head) < GEOMETRY.size:
            raise CorruptRecordError(f"{path}: arena header is truncated")
        magic, slab, nslabs, table_at, data_at = GEOMETRY.unpack(head)
        if magic != MAGIC or data_at + slab * nslabs != st.st_size:
            raise CorruptRecordError(f"{path}: not a dataflow arena (or another version)")
        raw = os.pread(fd, RECORD.itemsize * nslabs, table_at)
    finally:
        os.close(fd)  # drops the flock
    if len(raw) != RECORD.itemsize * nslabs:
        raise CorruptRecordError(f"{path}: arena table is truncated")
    table = np.frombuffer(raw, dtype=RECORD)
    runs = []
    states = {LIVE: "LIVE", WRITING: "WRITING", STAGED: "STAGED"}
    for i in np.flatnonzero(np.isin(table["state"], list(states))).tolist():
        r = table[i]
        runs.append(
            ArenaRun(
                state=states[int(r["state"])],
                start=i,
                span=int(r["span"]),
                generation=int(r["tag"]),
                idhash=int(r["idhash"]),
                owner=r["owner"].decode(errors="replace"),
                offset=data_at + i * slab,
                nbytes=int(r["nbytes"]),
            )
        )
    return st.st_size, st.st_blocks * 512, slab, nslabs, tuple(runs)
