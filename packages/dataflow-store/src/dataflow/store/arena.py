"""A preallocated shared-memory arena for ``shm://``: samples in reused slabs, not new segments.

One file per store, ``/dev/shm/dfs~<store>~arena``: a header page, a slab table, then
``nslabs`` slabs of ``slab_bytes`` each. A sample (its safetensors layout, as in a segment) takes
one run of consecutive slabs. The creator fixes the geometry; later openers use it as found.

Why: a new segment per sample pays tmpfs page allocation and zeroing on put, page-table set-up
on get and page freeing on release. Here each process maps the arena once; a slab's pages are
allocated and mapped the first time the slab is used and then reused, so a put is one copy into
already-mapped memory and a get maps nothing.

Guarantees:
- **Cross-process table, crash-safe.** Every table change runs under ``flock`` on the arena
  file (released by the kernel if the holder dies). A run is ``WRITING`` (owner recorded) until
  its bytes are complete, then ``LIVE``; a reader sees a whole generation or none. A foreign
  writer's run (:mod:`dataflow.store.staging`) goes ``WRITING`` -> ``STAGED`` (owned by its
  steward, never read by ``get``) -> ``LIVE`` when the steward adopts it.
- **A slab in use is never reused.** A reader pins the run it views with an open-file-description
  read lock on that byte range (the kernel drops it when the reader dies); the allocator skips
  any run another open file description has locked, and this instance's own pinned runs.
- **The view rule.** ``get`` returns tensors viewing the arena (zero copy), through a
  copy-on-write mapping: writing to them never reaches the arena or another reader. The run stays
  pinned until *every* tensor of that get (and every view derived from them) has been garbage
  collected, whether or not the lease was released: a tensor still referenced is never
  overwritten by a later sample. Release returns the lease; the slab returns to the free pool
  once its sample is freed and no tensor of any live process views it. A second get of a run
  this process already views gets its own private mapping, so two gets never alias.
- **Nothing outlives its users.** The arena file is unlinked when it holds no ``WRITING`` or
  ``LIVE`` run and no other open file description holds a pin or the keeper lock (instances that
  put into the arena hold it while open); a dead producer's runs are freed by ``gc`` as its
  segments were.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import mmap
import os
import struct
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from dataflow.contracts import CorruptRecordError, FeatureSpec, InvalidInputError
from dataflow.store.arena_format import CONT, FREE, GEOMETRY, LIVE, MAGIC, RECORD, STAGED, WRITING
from dataflow.store.layout import Layout, check_against, read_header, view
from dataflow.store.tensors import PreparedSample, as_bytes

PAGE = mmap.PAGESIZE
MAX_SLAB = 1 << 20
TARGET_SLABS = 1024
PARALLEL_COPY_BYTES = 4 << 20
"""A tensor at least this large is copied into the arena by torch's intra-op thread pool; a
smaller one by one plain memcpy in the calling thread: waking the pool costs more than it saves
on a small copy (tens of microseconds idle, milliseconds on a loaded machine)."""

_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = "hhqqi4x"  # struct flock on Linux (type, whence, start, len, pid)
_PM_PRESENT, _PM_FILE = np.uint64(1 << 63), np.uint64(1 << 61)


def parse_arena_bytes(value: object, where: str) -> int:
    """Validate an ``arena_bytes`` option (int, or a decimal string from the URI); 0 = off."""
    if isinstance(value, str):
        if not value.isdigit():
            raise InvalidInputError(
                f"{where}: arena_bytes must be a whole number of bytes >= 0, got {value!r}"
            )
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(f"{where}: arena_bytes must be an int >= 0, got {value!r}")
    return value


def geometry(arena_bytes: int) -> tuple[int, int]:
    """(slab_bytes, nslabs) for an arena of at least ``arena_bytes`` data bytes.

    Slabs are a power of two between one page and 1 MiB, about ``arena_bytes / 1024``.
    """
    slab = PAGE
    while slab < MAX_SLAB and slab * TARGET_SLABS < arena_bytes:
        slab *= 2
    return slab, max(1, -(-arena_bytes // slab))


@dataclass(frozen=True)
class Run:
    """Where one generation sits: first slab, number of slabs, byte offset and length."""

    start: int
    span: int
    offset: int
    length: int


class ArenaFull(Exception):
    """No free run fits this sample now (the caller falls back to a segment)."""


def _lock_struct(kind: int, start: int, length: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, start, length, 0)


class Arena:
    """One process's attachment to a store's arena file (see the module docstring)."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd
        st = os.fstat(fd)
        self.inode = (st.st_dev, st.st_ino)
        head = os.pread(fd, GEOMETRY.size, 0)
        if len(head) < GEOMETRY.size:
            raise CorruptRecordError(f"{path}: arena header is truncated")
        magic, self.slab, self.nslabs, self._table_at, self.data_at = GEOMETRY.unpack(head)
        if magic != MAGIC or self.data_at + self.slab * self.nslabs != st.st_size:
            raise CorruptRecordError(f"{path}: not a dataflow arena (or another version)")
        self._shared = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED)
        self.table = np.ndarray(
            (self.nslabs,), dtype=RECORD, buffer=self._shared, offset=self._table_at
        )
        self._private: mmap.mmap | None = None
        self._private_at = 0
        self._written = np.zeros(self.nslabs, dtype=bool)  # slabs faulted in _shared here
        self._readable = np.zeros(self.nslabs, dtype=bool)  # slabs faulted in _private here
        self._pinned = np.zeros(self.nslabs, dtype=bool)
        self._pins: dict[int, list[int]] = {}  # run start -> [count, span]
        self._thread_lock = threading.RLock()
        self._depth = 0  # > 0 while this instance's state is being changed (re-entry guard)
        self._unpins: collections.deque[int] = collections.deque()
        self.keeper = False
        self.closed = False
        self._pagemap: int | None = None
        with contextlib.suppress(OSError):
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        # An instance dropped without close() still gives its fds (and so its locks) back.
        self._closer = weakref.finalize(self, _close_fds, fd, self._pagemap)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str) -> Arena | None:
        """Attach to the arena at ``path``, or None when there is none."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            return cls(path, fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def create(cls, path: str, arena_bytes: int, owner: str) -> Arena:
        """Create the arena at ``path`` (sparse: pages are allocated as slabs are first used),
        or attach to the one another process created first.
        """
        slab, nslabs = geometry(arena_bytes)
        table_at = PAGE
        data_at = table_at + -(-(RECORD.itemsize * nslabs) // PAGE) * PAGE
        temp = f"{path}~{owner}.tmp"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, data_at + slab * nslabs)
            os.pwrite(fd, GEOMETRY.pack(MAGIC, slab, nslabs, table_at, data_at), 0)
            try:
                os.link(temp, path)
            except FileExistsError:
                os.close(fd)
                fd = -1
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        if fd < 0:
            found = cls.open(path)
            if found is None:
                raise FileNotFoundError(path)  # vanished between link and open: caller retries
            return found
        try:
            return cls(path, fd)
        except BaseException:
            os.close(fd)
            raise

    def current(self) -> bool:
        """Whether ``path`` still names this arena (it is unlinked once unused)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self.inode

    # ------------------------------------------------------------------ locking

    @contextlib.contextmanager
    def local(self) -> Iterator[None]:
        """Guard the instance's own state (pins, mapped slabs) against its other threads."""
        with self._thread_lock:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1

    @contextlib.contextmanager
    def locked(self) -> Iterator[bool]:
        """The table mutex (this instance's threads and every other open file description).

        Yields False when the arena was unlinked meanwhile (the caller attaches anew).
        """
        with self.local():
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                self.drain_unpins()
                yield os.fstat(self._fd).st_nlink > 0
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _range_lock(self, kind: int, offset: int, length: int) -> None:
        fcntl.fcntl(self._fd, _F_OFD_SETLK, _lock_struct(kind, offset, length))

    def _others_hold(self, offset: int, length: int) -> bool:
        """Whether another open file description holds any lock in [offset, offset+length)."""
        got = fcntl.fcntl(self._fd, _F_OFD_GETLK, _lock_struct(fcntl.F_WRLCK, offset, length))
        return struct.unpack(_FLOCK, got)[0] != fcntl.F_UNLCK

    def close_keeper(self) -> None:
        """Stop keeping the arena (this instance is closing)."""
        if self.keeper:
            self._range_lock(fcntl.F_UNLCK, 0, 1)
            self.keeper = False

    def hold_keeper(self) -> None:
        """Keep the arena while this instance is open (a shared lock on the header page)."""
        if not self.keeper:
            self._range_lock(fcntl.F_RDLCK, 0, 1)
            self.keeper = True

    # ------------------------------------------------------------------ table queries

    def find(self, idhash: int, generation: int) -> Run | None:
        """The LIVE run of (sample, generation), or None. Call under :meth:`locked`."""
        t = self.table
        hits = np.flatnonzero(
            (t["state"] == LIVE) & (t["tag"] == np.uint64(generation)) & (t["idhash"] == idhash)
        )
        return self._run(int(hits[0])) if len(hits) else None

    def find_staged(self, idhash: int, generation: int) -> Run | None:
        """The STAGED run of (sample, generation), or None. Call under :meth:`locked`."""
        t = self.table
        hits = np.flatnonzero(
            (t["state"] == STAGED) & (t["tag"] == np.uint64(generation)) & (t["idhash"] == idhash)
        )
        return self._run(int(hits[0])) if len(hits) else None

    def staged_starts(self, idhash: int, generation: int | None) -> list[int]:
        """Starts of the STAGED runs of a sample (one generation, or all). Under locked."""
        t = self.table
        hit = (t["state"] == STAGED) & (t["idhash"] == idhash)
        if generation is not None:
            hit &= t["tag"] == np.uint64(generation)
        return [int(i) for i in np.flatnonzero(hit)]

    def generations(self, idhash: int) -> list[int]:
        """Generations of LIVE runs of the sample with this id hash. Call under :meth:`locked`."""
        t = self.table
        return [int(g) for g in t["tag"][(t["state"] == LIVE) & (t["idhash"] == idhash)]]

    def heads(self) -> list[tuple[int, int, str, int, int]]:
        """(start, state, owner, tag, idhash) of every WRITING/LIVE/STAGED run. Under locked."""
        t = self.table
        out = []
        in_use = (t["state"] == LIVE) | (t["state"] == WRITING) | (t["state"] == STAGED)
        for i in np.flatnonzero(in_use):
            r = t[i]
            out.append(
                (int(i), int(r["state"]), r["owner"].decode(), int(r["tag"]), int(r["idhash"]))
            )
        return out

    def empty(self) -> bool:
        return not bool(np.any(self.table["state"] != FREE))

    def _run(self, start: int) -> Run:
        span = int(self.table["span"][start])
        return Run(start, span, self.data_at + start * self.slab, span * self.slab)

    # ------------------------------------------------------------------ writing

    def allocate(self, nbytes: int, generation: int, idhash: int, owner: str) -> Run:
        """Claim a free run for ``nbytes`` (state WRITING). Call under :meth:`locked`.

        Raises :class:`ArenaFull` when no free, unpinned run is long enough.
        """
        span = -(-nbytes // self.slab)
        if span > self.nslabs:
            raise ArenaFull(f"{nbytes} bytes is more than the whole arena")
        free = ((self.table["state"] == FREE) & ~self._pinned).astype(np.int32)
        sums = np.concatenate(([0], np.cumsum(free)))
        fits = np.flatnonzero(sums[span:] - sums[:-span] == span)
        skip_to = 0
        for start in fits.tolist():
            if start < skip_to:
                continue
            offset = self.data_at + start * self.slab
            if self._others_hold(offset, span * self.slab):
                skip_to = start + 1
                continue
            rows = self.table[start : start + span]
            rows["state"], rows["span"], rows["tag"], rows["idhash"] = CONT, 0, generation, idhash
            rows["owner"] = owner.encode()
            head = self.table[start : start + 1]
            head["state"], head["span"], head["nbytes"] = WRITING, span, nbytes
            return Run(start, span, offset, span * self.slab)
        raise ArenaFull(f"no free run of {span} slab(s) of {self.slab} bytes")

    def writable(self, run: Run, layout: Layout) -> dict[str, torch.Tensor]:
        """Write ``layout``'s header into ``run`` and return writable tensors viewing each of
        its entries in the shared mapping (no lock needed: the run is ours until published).
        """
        self._populate(run)
        self._shared[run.offset : run.offset + len(layout.header)] = layout.header
        blob = memoryview(self._shared)[run.offset : run.offset + run.length]
        return {name: view(blob, entry) for name, entry in layout.entries.items()}

    def stage(self, run: Run, steward_owner: str) -> None:
        """WRITING -> STAGED, owned by the steward from now on. Call under :meth:`locked`."""
        self.set_owner(run.start, steward_owner)
        self.table["state"][run.start] = STAGED

    def _populate(self, run: Run) -> None:
        todo = np.flatnonzero(~self._written[run.start : run.start + run.span])
        if len(todo):  # first use of these slabs in this process: allocate + map once
            first, last = run.start + int(todo[0]), run.start + int(todo[-1]) + 1
            self._shared.madvise(
                _MADV_POPULATE_WRITE,
                self.data_at + first * self.slab,
                (last - first) * self.slab,
            )  # raises OSError (ENOMEM/EFAULT) if /dev/shm is full, instead of SIGBUS
            self._written[first:last] = True

    def write(self, run: Run, layout: Layout, sample: PreparedSample) -> None:
        """Copy the header and tensors into ``run`` (no lock needed: the run is ours)."""
        self._populate(run)
        self._shared[run.offset : run.offset + len(layout.header)] = layout.header
        for name, entry in layout.entries.items():
            tensor = sample.tensors[name]
            if not tensor.numel():
                continue
            at, nbytes = run.offset + entry.start, entry.end - entry.start
            if nbytes < PARALLEL_COPY_BYTES:
                self._shared[at : at + nbytes] = as_bytes(tensor)  # one memcpy, this thread
            else:
                target = torch.frombuffer(self._shared, dtype=torch.uint8, count=nbytes, offset=at)
                target.copy_(tensor.reshape(-1).view(torch.uint8))

    def publish(self, run: Run) -> None:
        """WRITING (or STAGED, on adoption) -> LIVE. Call under :meth:`locked`."""
        self.table["state"][run.start] = LIVE

    def free(self, start: int) -> int:
        """Return a run's slabs to the pool (pins still protect readers); its byte length."""
        span = int(self.table["span"][start])
        rows = self.table[start : start + max(span, 1)]
        rows["state"], rows["span"], rows["tag"], rows["idhash"] = FREE, 0, 0, 0
        rows["nbytes"], rows["owner"] = 0, b""
        return span * self.slab

    def set_owner(self, start: int, owner: str) -> None:
        self.table["owner"][start : start + int(self.table["span"][start])] = owner.encode()

    def may_unlink(self, exiting: bool = False) -> bool:
        """No run in use, no pin here (unless ``exiting``: this process reads nothing more), no
        other holder of any lock. Call under :meth:`locked`.
        """
        return (
            not self.keeper
            and self.empty()
            and (exiting or not self._pins)
            and not self._others_hold(0, self.data_at + self.nslabs * self.slab)
        )

    # ------------------------------------------------------------------ reading

    def pin(self, run: Run) -> bool:
        """Pin ``run`` against reuse; True when this process already viewed it. Under locked."""
        entry = self._pins.get(run.start)
        if entry is not None:
            entry[0] += 1
            return True
        self._range_lock(fcntl.F_RDLCK, run.offset, run.length)
        self._pins[run.start] = [1, run.span]
        self._pinned[run.start : run.start + run.span] = True
        return False

    def view_run(self, run: Run, aliased: bool) -> tuple[memoryview, Callable[[], None]]:
        """A copy-on-write byte view of ``run`` and the callback that unpins it.

        The view is of the persistent private mapping unless this process already views the run
        (``aliased``); then it gets a fresh mapping of its own.
        """
        if aliased:
            fresh = mmap.mmap(
                self._fd,
                run.length,
                flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=run.offset,
            )
            with contextlib.suppress(OSError, ValueError):
                fresh.madvise(_MADV_POPULATE_READ, 0, run.length)
            return memoryview(fresh), self._unpin_later(run.start)
        if self._private is None:
            size = self.nslabs * self.slab
            self._private = mmap.mmap(
                self._fd,
                size,
                flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=self.data_at,
            )
            probe = torch.frombuffer(self._private, dtype=torch.uint8, count=1)
            self._private_at = probe.data_ptr()
            del probe
        todo = np.flatnonzero(~self._readable[run.start : run.start + run.span])
        if len(todo):
            first, last = run.start + int(todo[0]), run.start + int(todo[-1]) + 1
            with contextlib.suppress(OSError, ValueError):
                self._private.madvise(
                    _MADV_POPULATE_READ, first * self.slab, (last - first) * self.slab
                )
            self._readable[first:last] = True
        at = run.start * self.slab
        return memoryview(self._private)[at : at + run.length], self._unpin_later(run.start)

    def _unpin_later(self, start: int) -> Callable[[], None]:
        me = weakref.ref(self)

        def unpin() -> None:  # runs when the last tensor of one get is collected
            arena = me()
            if arena is None:
                return
            arena._unpins.append(start)
            if arena._thread_lock.acquire(blocking=False):
                try:
                    if arena._depth == 0:  # not re-entering this thread's own locked section
                        with arena.local():
                            arena.drain_unpins()
                finally:
                    arena._thread_lock.release()

        return unpin

    def drain_unpins(self) -> None:
        """Apply the unpins queued by collected tensors (call inside :meth:`local`)."""
        while self._unpins and not self.closed:
            start = self._unpins.popleft()
            entry = self._pins[start]
            entry[0] -= 1
            if entry[0] > 0:
                continue
            span = entry[1]
            del self._pins[start]
            self._discard_private_writes(start, span)
            self._range_lock(fcntl.F_UNLCK, self.data_at + start * self.slab, span * self.slab)
            self._pinned[start : start + span] = False

    def _discard_private_writes(self, start: int, span: int) -> None:
        """Drop pages a reader wrote (copy-on-write) so the next sample in the run shows through."""
        if self._private is None or not self._readable[start : start + span].any():
            return
        pages_per_slab = self.slab // PAGE
        first_page = (self._private_at // PAGE) + start * pages_per_slab
        npages = span * pages_per_slab
        dirty: np.ndarray | None = None
        if self._pagemap is not None:
            with contextlib.suppress(OSError):
                raw = os.pread(self._pagemap, npages * 8, first_page * 8)
                if len(raw) == npages * 8:
                    flags = np.frombuffer(raw, dtype=np.uint64)
                    dirty = ((flags & _PM_PRESENT) != 0) & ((flags & _PM_FILE) == 0)
        if dirty is None:
            dirty = np.ones(npages, dtype=bool)  # cannot tell: drop them all
        pages = np.flatnonzero(dirty)
        if not len(pages):
            return
        breaks = np.flatnonzero(np.diff(pages) != 1)
        firsts = np.concatenate((pages[:1], pages[breaks + 1]))
        lasts = np.concatenate((pages[breaks], pages[-1:])) + 1
        base = start * pages_per_slab
        for a, b in zip(firsts.tolist(), lasts.tolist(), strict=True):
            self._private.madvise(mmap.MADV_DONTNEED, (base + a) * PAGE, (b - a) * PAGE)
        touched = np.unique(pages // pages_per_slab) + start
        self._readable[touched] = False

    def read(
        self, blob: memoryview, wanted: Mapping[str, FeatureSpec], sample_id: str, where: str
    ) -> dict[str, torch.Tensor]:
        """Tensors viewing ``blob`` (one run) after checking its header names ``sample_id``."""
        layout = read_header(blob, len(blob), where)
        if layout.metadata.get("sample_id") != sample_id:
            raise CorruptRecordError(f"{where}: the arena run holds another sample")
        check_against(layout, wanted, where)
        return {name: view(blob, layout.entries[name]) for name in wanted}

    def sample_id_at(self, start: int) -> str | None:
        """The sample id in the header of the run at ``start`` (None if unreadable)."""
        run = self._run(start)
        blob = memoryview(self._shared)[run.offset : run.offset + run.length]
        try:
            return read_header(blob, run.length, self.path).metadata.get("sample_id")
        except CorruptRecordError:
            return None
        finally:
            blob.release()

    def close(self) -> None:
        """Detach: drop the keeper lock, this fd and the mappings.

        Tensors still alive keep their mapping, and with it their pins (the open file
        description lives while any mapping of it does; the kernel drops its locks with it).
        """
        with self.local():
            if self.closed:
                return
            if self.keeper:
                with contextlib.suppress(OSError):
                    self._range_lock(fcntl.F_UNLCK, 0, 1)
                self.keeper = False
            self.closed = True
            self._unpins.clear()
        self.table = None  # type: ignore[assignment]
        self._shared = None  # type: ignore[assignment]
        self._private = None
        self._pagemap = None
        self._closer()


def _close_fds(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def space_error(exc: OSError) -> bool:
    """Whether populating slabs failed for lack of memory (then the put uses a segment)."""
    return exc.errno in (errno.ENOMEM, errno.EFAULT, errno.ENOSPC, errno.EFBIG)
