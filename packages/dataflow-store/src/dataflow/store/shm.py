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
  When the store has an arena (the steward's ``reserve`` creates it), a staged sample goes into
  an arena run instead (``WRITING`` under the writer, ``STAGED`` under the steward, ``LIVE`` on
  adoption: no new segment, no page allocation for memory already used), by the same rules;
  ``stage_writer`` hands out tensors viewing that run (or the temporary segment) to write in
  place.

Arena (:mod:`dataflow.store.arena`): with ``arena_bytes`` > 0 (keyword option or
``shm://name?arena_bytes=N``; by default ``budget_bytes`` when the store has a byte budget, else
0; ``arena_bytes=0`` turns it off: one segment per sample) puts go into one
preallocated arena file per store, ``dfs~<store>~arena``, reused across samples: a put is one
copy into already-mapped memory and a get maps nothing (see that module for the view rule: a
get's tensors are never overwritten while any of them is alive). Any process reads arena samples,
whatever its own options. A sample that does not fit a free run of the arena (larger than the
arena, or the arena full of live or still-viewed samples) falls back to its own segment, as
without an arena; the budget refuses puts exactly as before. The first process to create the
arena fixes its size. :func:`dataflow.store.usage.shm_usage` reads a store's segments and arena
runs in use from outside any store process.

Options: the common ones (:class:`~dataflow.store.base.BookkeepingStore`), ``root`` (the
shared-memory directory, default ``/dev/shm``) and ``arena_bytes``. Segments are created mode
0600: producer and consumers must run as the same user.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import mmap
import os
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from dataflow.contracts import (
    CapacityExceededError,
    CorruptRecordError,
    DataflowError,
    FeatureSpec,
    InvalidInputError,
    NotFoundError,
)
from dataflow.contracts.uris import ParsedURI
from dataflow.store.arena import Arena, ArenaFull, parse_arena_bytes, space_error
from dataflow.store.arena_format import LIVE, id_hash
from dataflow.store.base import BookkeepingStore, Generation
from dataflow.store.layout import Layout, check_against, plan, read_header, view
from dataflow.store.owner import DETACHED, current_owner, owner_alive
from dataflow.store.segments import map_sample, read_layout, write_sample
from dataflow.store.staging import (
    StagedWrite,
    check_staged_file,
    parse_steward,
    read_staged_file,
    same_specs,
)
from dataflow.store.tensors import PreparedSample

PREFIX = "dfs~"
MAX_STORE_NAME = 40
_OWNER_KEY = "owner"
ARENA = "arena"
_log = logging.getLogger(__name__)
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_OPEN: weakref.WeakSet[ShmFeatureStore] = weakref.WeakSet()


@atexit.register
def _leave_arenas_at_exit() -> None:
    """A process exiting without close() stops keeping its arenas (unlinked if unused)."""
    for store in list(_OPEN):
        with contextlib.suppress(Exception):
            store._leave_arena(exiting=True)


class ShmFeatureStore(BookkeepingStore):
    """Feature store over POSIX shared memory (``shm://name``; empty name = ``default``)."""

    backend = "shm"
    shared = True
    staging = True

    def __init__(
        self,
        parsed: ParsedURI,
        *,
        root: str = "/dev/shm",
        arena_bytes: int | None = None,
        **options: Any,
    ) -> None:
        name = parsed.location or "default"
        where = f"shm://{name}"
        unknown = sorted(set(parsed.options) - {"arena_bytes"})
        if unknown:
            raise InvalidInputError(
                f"{where}: unknown URI option(s) {unknown}; shm:// knows only arena_bytes"
            )
        in_uri = parsed.options.get("arena_bytes")
        size = None if arena_bytes is None else parse_arena_bytes(arena_bytes, where)
        if in_uri is not None:
            from_uri = parse_arena_bytes(in_uri, where)
            if size is not None and size != from_uri:
                raise InvalidInputError(
                    f"{where}: arena_bytes is {from_uri} in the URI but {size} as an option"
                )
            size = from_uri
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
        if size is None:  # the default: an arena of the byte budget (module docstring)
            size = self.options.budget_bytes or 0
        self._arena_bytes = size
        self._arena_path = os.path.join(root, f"{PREFIX}{name}~{ARENA}")
        self._arena: Arena | None = None
        self._attach_lock = threading.Lock()  # one attachment per instance, whatever the threads
        self._in_arena: set[tuple[str, int]] = set()
        _OPEN.add(self)

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

    # ------------------------------------------------------------------ arena

    @contextlib.contextmanager
    def _arena_locked(self, create: bool) -> Iterator[Arena | None]:
        """The current arena with its table locked (None: there is none and ``create`` is off)."""
        for _ in range(8):
            try:
                arena = self._attach(create)
            except FileNotFoundError:
                continue  # unlinked while attaching: try again
            except OSError as exc:
                if not create:
                    raise
                _log.warning("%s: no arena (%s); puts use one segment each", self.uri, exc)
                arena = None
            if arena is None:
                yield None
                return
            with arena.locked() as current:
                if current:
                    yield arena
                    return
            self._drop_arena(arena)  # unlinked by its last user: attach to the next one
        raise DataflowError(f"{self.uri}: the arena kept being replaced while attaching")

    def _attach(self, create: bool) -> Arena | None:
        with self._attach_lock:
            arena = self._arena
            if arena is None or arena.closed:
                arena = Arena.open(self._arena_path)
                if arena is None and create:
                    arena = Arena.create(self._arena_path, self._arena_bytes, self._owner)
                self._arena = arena
            return arena

    def _leave_arena(self, exiting: bool = False) -> None:
        """Stop keeping the arena and unlink it if unused (its runs stay, as orphans)."""
        arena = self._arena
        if arena is None:
            return
        with self._arena_locked(create=False) as current:
            if current is arena:
                arena.close_keeper()
                self._unlink_arena_if_unused(arena, exiting)
        self._drop_arena(arena)

    def _drop_arena(self, arena: Arena) -> None:
        with self._attach_lock:
            if self._arena is arena:
                self._arena = None
        arena.close()

    def _unlink_arena_if_unused(self, arena: Arena, exiting: bool = False) -> None:
        """Under the arena lock: remove the arena file once nothing uses it (module docs)."""
        if arena.may_unlink(exiting):
            _unlink(self._arena_path)

    def _write_arena(self, sample_id: str, generation: int, sample: PreparedSample) -> bool:
        layout = plan(sample.specs.values(), {_OWNER_KEY: self._owner, "sample_id": sample_id})
        if layout.total_bytes > self._arena_bytes:
            return False  # can never fit: its own segment, as without an arena
        with self._arena_locked(create=True) as arena:
            if arena is None:
                return False
            arena.hold_keeper()
            try:
                run = arena.allocate(
                    layout.total_bytes, generation, id_hash(sample_id), self._owner
                )
            except ArenaFull:
                return False
        try:
            arena.write(run, layout, sample)
        except BaseException as exc:
            with arena.locked():
                arena.free(run.start)
            if isinstance(exc, OSError) and space_error(exc):
                return False  # /dev/shm is full: the segment path reports it as today
            raise
        with arena.locked():
            arena.publish(run)
        with self._lock:
            self._in_arena.add((sample_id, generation))
        return True

    def _read_arena(
        self, sample_id: str, generation: int, wanted: Mapping[str, FeatureSpec]
    ) -> dict[str, torch.Tensor] | None:
        with self._arena_locked(create=False) as arena:
            if arena is None:
                return None
            run = arena.find(id_hash(sample_id), generation)
            if run is None:
                return None
            aliased = arena.pin(run)
            blob, unpin = arena.view_run(run, aliased)
        done = weakref.finalize(blob, unpin)
        try:
            return arena.read(blob, wanted, sample_id, self._where(sample_id, generation))
        except BaseException:
            done()  # nothing views the run: unpin now, not when the traceback goes
            raise

    def _free_arena(self, sample_id: str, generation: int) -> None:
        with self._arena_locked(create=False) as arena:
            if arena is None:
                return
            run = arena.find(id_hash(sample_id), generation)
            if run is not None:
                arena.free(run.start)
            self._unlink_arena_if_unused(arena)
        with self._lock:
            self._in_arena.discard((sample_id, generation))

    def _arena_generations(self, sample_id: str) -> list[int]:
        with self._arena_locked(create=False) as arena:
            return [] if arena is None else arena.generations(id_hash(sample_id))

    def _reclaim_arena(self) -> tuple[int, int]:
        freed_bytes = self._reclaim_arena_temporaries()
        reclaimed: list[tuple[str, int]] = []
        with self._lock:  # taken before, never inside, the arena lock (lock order)
            leased = {(id_hash(s), g) for s, g in self._lease_counts}
        with self._arena_locked(create=False) as arena:
            if arena is None:
                return 0, freed_bytes
            for start, state, owner, tag, idhash in arena.heads():
                if owner_alive(owner) or (idhash, tag) in leased:
                    continue
                sid = arena.sample_id_at(start) if state == LIVE else None
                freed_bytes += arena.free(start)
                if sid is not None:  # None: a half-written run, bytes only (a temporary)
                    reclaimed.append((sid, tag))
            self._unlink_arena_if_unused(arena)
        with self._lock:
            for sid, tag in reclaimed:
                stale = self._resident.get(sid)
                if stale is not None and stale.generation == tag:
                    self._forget(stale)
                else:
                    self._tombstone(sid, tag)
        return len(reclaimed), freed_bytes

    def _reclaim_arena_temporaries(self) -> int:
        """Unlink arena files a dead process was creating (``…~arena~<owner>.tmp``)."""
        stem = f"{os.path.basename(self._arena_path)}~"
        freed = 0
        for entry in os.listdir(self._root):
            if not (entry.startswith(stem) and entry.endswith(".tmp")):
                continue
            if owner_alive(entry[len(stem) : -len(".tmp")]):
                continue
            path = os.path.join(self._root, entry)
            with contextlib.suppress(FileNotFoundError):
                freed += os.stat(path, follow_symlinks=False).st_blocks * 512
                os.unlink(path)
        return freed

    # ------------------------------------------------------------------ segments

    def _write(self, sample_id: str, generation: int, sample: PreparedSample) -> None:
        if self._arena_bytes and self._write_arena(sample_id, generation, sample):
            return
        self._publish_segment(
            self._path(sample_id, generation), self._owner, sample_id, generation, sample
        )
        with self._lock:
            self._mine.add((sample_id, generation))

    def _publish_segment(
        self, name: str, owner: str, sample_id: str, generation: int, sample: PreparedSample
    ) -> None:
        """Write ``sample`` (headed by ``owner``) to this process's temporary, then link it to
        ``name``: readers see a whole segment or none, and a taken name is never overwritten
        (``FileExistsError``: a name, once published, is one generation).
        """
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
            os.link(temp, name)
        finally:
            _unlink(temp)

    # ------------------------------------------------------------------ staging

    def _staged_path(self, sample_id: str, generation: int, owner: str | None = None) -> str:
        return f"{self._path(sample_id, generation)}~{owner or self._owner}.staged"

    def _write_staged(
        self, sample_id: str, generation: int, sample: PreparedSample, steward: str
    ) -> None:
        _, owner = parse_steward(steward)
        layout = plan(sample.specs.values(), {_OWNER_KEY: owner, "sample_id": sample_id})
        in_arena = self._arena_writer(sample_id, generation, layout, owner)
        if in_arena is not None:
            with in_arena:
                for name, tensor in sample.tensors.items():
                    in_arena.tensors[name].copy_(tensor)
            return
        staged = self._staged_path(sample_id, generation, owner)
        try:
            self._publish_segment(staged, owner, sample_id, generation, sample)
        except FileExistsError:
            raise CorruptRecordError(
                f"{self._where(sample_id, generation)} is already staged; refusing to "
                "overwrite it (reserve a new generation)"
            ) from None

    def _staged_writer(
        self, sample_id: str, generation: int, specs: dict[str, FeatureSpec], steward: str
    ) -> StagedWrite:
        """Tensors viewing this writer's temporary segment (allocated up front, so a full
        ``/dev/shm`` is a ``CapacityExceededError`` here, never a SIGBUS on a write), linked
        to the staged name on publish; discard unlinks the temporary.
        """
        _, owner = parse_steward(steward)
        staged = self._staged_path(sample_id, generation, owner)
        where = self._where(sample_id, generation)
        layout = plan(specs.values(), {_OWNER_KEY: owner, "sample_id": sample_id})
        in_arena = self._arena_writer(sample_id, generation, layout, owner)
        if in_arena is not None:
            return in_arena
        temp = f"{self._path(sample_id, generation)}~{self._owner}.tmp"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, layout.total_bytes)
            except OSError as exc:
                raise CapacityExceededError(
                    f"{where}: no room for {layout.total_bytes} bytes in {self._root} "
                    f"({os.strerror(exc.errno or 0)}); nothing was staged"
                ) from exc
            mapped = mmap.mmap(fd, layout.total_bytes, flags=mmap.MAP_SHARED)
        except BaseException:
            _unlink(temp)
            raise
        finally:
            os.close(fd)
        with contextlib.suppress(OSError, ValueError):  # page tables in one call (>= 5.14)
            mapped.madvise(_MADV_POPULATE_WRITE, 0, layout.total_bytes)
        mapped[: len(layout.header)] = layout.header
        tensors = {name: view(mapped, entry) for name, entry in layout.entries.items()}

        def publish() -> None:
            try:
                os.link(temp, staged)
            except FileExistsError:
                raise CorruptRecordError(
                    f"{where} is already staged; refusing to overwrite it (reserve a new "
                    "generation)"
                ) from None

        return StagedWrite(tensors, publish, lambda: _unlink(temp))

    def _arena_writer(
        self, sample_id: str, generation: int, layout: Layout, steward_owner: str
    ) -> StagedWrite | None:
        """A staged write into a run of the store's arena (already-faulted memory, no new
        segment), when an arena exists and has room; None: use a segment. The run is
        ``WRITING`` under this writer's identity (``gc`` frees it if the writer dies), then
        ``STAGED`` under the steward's on publish.
        """
        where = self._where(sample_id, generation)
        idhash = id_hash(sample_id)
        with self._arena_locked(create=False) as arena:
            if arena is None or layout.total_bytes > arena.slab * arena.nslabs:
                return None
            if arena.find_staged(idhash, generation) is not None:
                raise CorruptRecordError(
                    f"{where} is already staged; refusing to overwrite it (reserve a new "
                    "generation)"
                )
            # No keeper lock: the arena is never unlinked while it holds a run, and a writer
            # (e.g. a capture server) must not keep it alive once the steward is gone.
            try:
                run = arena.allocate(layout.total_bytes, generation, idhash, self._owner)
            except ArenaFull:
                return None
        state = {"open": True}

        def discard() -> None:
            if state.pop("open", False):
                with arena.locked():
                    arena.free(run.start)

        def publish() -> None:
            with arena.locked():
                if arena.find_staged(idhash, generation) is not None:
                    raise CorruptRecordError(
                        f"{where} is already staged; refusing to overwrite it (reserve a new "
                        "generation)"
                    )
                arena.stage(run, steward_owner)
                state.pop("open", None)

        try:
            tensors = arena.writable(run, layout)
        except BaseException as exc:
            discard()
            if isinstance(exc, OSError) and space_error(exc):
                return None  # /dev/shm is full: the segment path reports it
            raise
        return StagedWrite(tensors, publish, discard)

    def reserve(self, sample_id: str) -> int:
        """As the base class; with an arena configured, it exists from now on, so that a
        foreign writer (which opens the store by URI, without options) stages into it.
        """
        if self._arena_bytes:
            with self._arena_locked(create=True) as arena:
                if arena is not None:
                    arena.hold_keeper()
        return super().reserve(sample_id)

    def _staged_run(self, arena: Arena | None, sample_id: str, generation: int) -> Any:
        return None if arena is None else arena.find_staged(id_hash(sample_id), generation)

    def _staged_layout(self, arena: Arena, run: Any, sample_id: str, where: str) -> Any:
        blob = memoryview(arena._shared)[run.offset : run.offset + run.length]
        layout = read_header(blob, len(blob), where)
        if layout.metadata.get("sample_id") != sample_id:
            raise CorruptRecordError(f"{where}: the staged arena run holds another sample")
        return blob, layout

    def _check_staged(
        self, sample_id: str, generation: int, specs: Mapping[str, FeatureSpec]
    ) -> None:
        where = self._where(sample_id, generation)
        with self._arena_locked(create=False) as arena:
            run = self._staged_run(arena, sample_id, generation)
            if run is not None:
                assert arena is not None
                _, layout = self._staged_layout(arena, run, sample_id, f"{where} (staged)")
                same_specs(layout.entries, specs, f"{where} (staged)")
                return
        check_staged_file(
            self._staged_path(sample_id, generation), specs, self._where(sample_id, generation)
        )

    def _read_staged(
        self, sample_id: str, generation: int, wanted: Mapping[str, FeatureSpec]
    ) -> dict[str, torch.Tensor]:
        where = self._where(sample_id, generation)
        with self._arena_locked(create=False) as arena:
            run = self._staged_run(arena, sample_id, generation)
            if run is not None:
                assert arena is not None
                blob, layout = self._staged_layout(arena, run, sample_id, f"{where} (staged)")
                check_against(layout, wanted, f"{where} (staged)")
                return {n: view(blob, layout.entries[n]).clone() for n in wanted}
        return read_staged_file(
            self._staged_path(sample_id, generation), wanted, self._where(sample_id, generation)
        )

    def _promote(self, sample_id: str, generation: int, specs: Mapping[str, FeatureSpec]) -> None:
        with self._arena_locked(create=False) as arena:
            run = self._staged_run(arena, sample_id, generation)
            if run is not None:
                assert arena is not None
                if arena.find(id_hash(sample_id), generation) is not None:
                    raise CorruptRecordError(
                        f"{self._where(sample_id, generation)} is already stored; not adopting "
                        "twice"
                    )
                arena.hold_keeper()
                arena.set_owner(run.start, self._owner)
                arena.publish(run)
                adopted = True
            else:
                adopted = False
        if adopted:
            with self._lock:
                self._in_arena.add((sample_id, generation))
            return
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
        with self._arena_locked(create=False) as arena:
            if arena is not None:
                for start in arena.staged_starts(id_hash(sample_id), generation):
                    arena.free(start)
                self._unlink_arena_if_unused(arena)
        for entry, sid, gen, owner in self._listing():
            staged = sid == sample_id and owner is not None and entry.endswith(".staged")
            if staged and (generation is None or gen == generation):
                _unlink(os.path.join(self._root, entry))

    # ------------------------------------------------------------------ bytes

    def _read(
        self, sample_id: str, generation: int, wanted: Mapping[str, FeatureSpec]
    ) -> dict[str, torch.Tensor]:
        got = self._read_arena(sample_id, generation, wanted)
        if got is not None:
            return got
        tensors, _ = map_sample(
            self._path(sample_id, generation), wanted, self._where(sample_id, generation)
        )
        return tensors

    def _delete(self, stored: Generation) -> None:
        _unlink(self._path(stored.sample_id, stored.generation))
        with self._lock:
            self._mine.discard((stored.sample_id, stored.generation))
        self._free_arena(stored.sample_id, stored.generation)

    def _exists(self, sample_id: str, generation: int) -> bool:
        if os.path.exists(self._path(sample_id, generation)):
            return True
        with self._arena_locked(create=False) as arena:
            return arena is not None and arena.find(id_hash(sample_id), generation) is not None

    def _generations(self, sample_id: str) -> list[int]:
        listed = [g for _, sid, g, tmp in self._listing() if sid == sample_id and tmp is None]
        return sorted(listed + self._arena_generations(sample_id))

    def _reclaim_orphans(self) -> tuple[int, int]:
        freed, freed_bytes = self._reclaim_arena()
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
            in_arena = sorted(self._in_arena)
            self._in_arena.clear()
        for sample_id, generation in mine:
            _detach(self._path(sample_id, generation), self._owner)
        arena = self._arena
        if arena is None:
            return
        with contextlib.suppress(OSError), self._arena_locked(create=False) as current:
            if current is arena:
                for sample_id, generation in in_arena:
                    run = arena.find(id_hash(sample_id), generation)
                    if run is not None:
                        arena.set_owner(run.start, DETACHED)
                arena.close_keeper()
                self._unlink_arena_if_unused(arena)
        self._drop_arena(arena)


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
