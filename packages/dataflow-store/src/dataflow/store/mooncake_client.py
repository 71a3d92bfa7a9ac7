"""A typed client over ``mooncake.store.MooncakeDistributedStore``: zero-copy, errors raised.

Every object is written straight from the caller's memory (``batch_put_from_multi_buffers``: one
object gathered from several buffers) and read straight into it
(``batch_get_into_multi_buffers``), with the buffers registered with the transfer engine for the
call (RDMA needs it; TCP ignores it). Returned status codes become dataflow errors
(:mod:`dataflow.store.mooncake_codes`). Nothing is ever serialised here.

Two Mooncake behaviours shape this API (measured on 0.3.13):
- a put to a key that exists returns 0 and keeps the OLD bytes — callers must never reuse a key;
- a read (or an existence check) grants a read lease (10 s by default) during which a plain
  remove fails with ``OBJECT_HAS_LEASE``; ``remove(force=True)`` ignores it. :meth:`remove`
  therefore reports per key what happened instead of raising.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from dataflow.contracts import (
    BackendUnavailableError,
    ClosedError,
    SchemaMismatchError,
)
from dataflow.store import mooncake_codes as codes
from dataflow.store.mooncake_connect import check_reachable, load_binding, probe_handshake
from dataflow.store.mooncake_settings import MooncakeSettings

PUT_ATTEMPTS = 4
"""How many times a put is tried when the transfer itself fails."""


@dataclass(frozen=True)
class Region:
    """``nbytes`` of process memory at address ``ptr`` (a tensor's storage, a header buffer)."""

    ptr: int
    nbytes: int


@dataclass(frozen=True)
class ObjectIO:
    """One Mooncake object and the buffers it is gathered from (put) or scattered into (get),
    in order; the object's size is the sum of the buffers' sizes.
    """

    key: str
    parts: tuple[Region, ...]

    @property
    def nbytes(self) -> int:
        """Size of the whole object."""
        return sum(part.nbytes for part in self.parts)


@dataclass(frozen=True)
class RemoveReport:
    """What one removal round did, key by key.

    ``removed``: deleted now; ``absent``: already gone (counts as freed); ``leased``: refused
    because a reader holds Mooncake's read lease; ``failed``: any other error, by key -> code.
    """

    removed: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    leased: tuple[str, ...] = ()
    failed: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when every key is gone."""
        return not self.leased and not self.failed

    def describe(self) -> str:
        """A one-line summary for error messages."""
        parts = [f"{len(self.removed) + len(self.absent)} gone"]
        if self.leased:
            parts.append(f"{len(self.leased)} under read lease")
        if self.failed:
            shown = ", ".join(
                f"{k!r}: {codes.code_name(c)}" for k, c in list(self.failed.items())[:4]
            )
            parts.append(f"{len(self.failed)} failed ({shown})")
        return "; ".join(parts)


class _Registrations:
    """Reference-counted transfer-engine registrations, so overlapping calls share them.

    Mooncake refuses to register a region overlapping a registered one; a region it refuses is
    simply used unregistered (fine over TCP; over RDMA the transfer then reports an error).
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._counts: dict[tuple[int, int], int] = {}

    @staticmethod
    def _merged(regions: Sequence[Region]) -> list[tuple[int, int]]:
        spans = sorted((r.ptr, r.ptr + r.nbytes) for r in regions if r.nbytes > 0)
        merged: list[list[int]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return [(start, end - start) for start, end in merged]

    @contextmanager
    def held(self, regions: Sequence[Region]) -> Iterator[None]:
        taken: list[tuple[int, int]] = []
        with self._lock:
            for span in self._merged(regions):
                if span in self._counts:
                    self._counts[span] += 1
                    taken.append(span)
                elif self._store.register_buffer(span[0], span[1]) == 0:
                    self._counts[span] = 1
                    taken.append(span)
        try:
            yield
        finally:
            with self._lock:
                for span in taken:
                    self._counts[span] -= 1
                    if self._counts[span] == 0:
                        del self._counts[span]
                        self._store.unregister_buffer(span[0])


class MooncakeClient:
    """One connected ``MooncakeDistributedStore``; thread-safe (the binding releases the GIL
    during transfers).

    Guarantees: :meth:`connect` either returns a client whose ``setup()`` succeeded or raises
    ``BackendUnavailableError`` within about ``connect_timeout_s`` (twice it at worst); every
    put is hard-pinned when the settings say so; no call after :meth:`close` reaches Mooncake
    (``ClosedError``).
    """

    def __init__(self, store: Any, settings: MooncakeSettings, replicate_config: Any) -> None:
        self._store = store
        self.settings = settings
        self._config = replicate_config
        self._registrations = _Registrations(store)
        self._closed = False
        self._close_lock = threading.Lock()

    @classmethod
    def connect(cls, settings: MooncakeSettings) -> MooncakeClient:
        """Check the master is reachable, probe the handshake, then ``setup()`` in-process."""
        binding = load_binding()
        check_reachable(settings)
        if settings.handshake_probe:
            probe_handshake(settings)
        store = binding.MooncakeDistributedStore()
        rc = store.setup(*settings.setup_args())
        if rc != 0:
            raise BackendUnavailableError(
                f"Mooncake setup() against {settings.master_address} returned {rc}"
            )
        config = binding.ReplicateConfig()
        config.replica_num = settings.replicas
        config.with_hard_pin = settings.hard_pin
        return cls(store, settings, config)

    def _live(self) -> Any:
        if self._closed:
            raise ClosedError(f"Mooncake client for {self.settings.master_address} is closed")
        return self._store

    def put(self, objects: Sequence[ObjectIO]) -> None:
        """Write each object from its buffers, in one batch call.

        All or nothing: if any object fails, the ones written by this call are force-removed
        and the first failure is raised (``CapacityExceededError`` when no segment has room).
        A transfer failure is retried up to ``PUT_ATTEMPTS`` times: the master keeps placing
        objects in the segment of a client that died until its heartbeat times out (~10 s).
        The caller guarantees the keys are new (a put never overwrites an existing key).
        """
        if not objects:
            return
        store = self._live()
        keys = [obj.key for obj in objects]
        for attempt in range(1, PUT_ATTEMPTS + 1):
            with self._registrations.held([p for obj in objects for p in obj.parts]):
                results = store.batch_put_from_multi_buffers(
                    keys,
                    [[p.ptr for p in obj.parts] for obj in objects],
                    [[p.nbytes for p in obj.parts] for obj in objects],
                    self._config,
                )
            failures = [(k, int(rc)) for k, rc in zip(keys, results, strict=True) if rc != 0]
            if not failures:
                return
            written = [k for k, rc in zip(keys, results, strict=True) if rc == 0]
            orphans = self.remove(written, force=True).failed if written else {}
            key, rc = failures[0]
            if orphans or rc != codes.TRANSFER_FAIL or attempt == PUT_ATTEMPTS:
                error = codes.error_for(rc, "put", key)
                if orphans:  # never silent: these keys outlive the failed put
                    error.add_note(f"objects it wrote that could not be removed: {sorted(orphans)}")
                raise error

    def get(self, objects: Sequence[ObjectIO]) -> None:
        """Read each object into its buffers, in one batch call; returns when all bytes are in.

        Raises ``NotFoundError`` for a missing key and ``SchemaMismatchError`` when an object's
        stored size differs from the buffers' total (no buffer is handed back half-filled).
        """
        if not objects:
            return
        store = self._live()
        keys = [obj.key for obj in objects]
        with self._registrations.held([p for obj in objects for p in obj.parts]):
            results = store.batch_get_into_multi_buffers(
                keys,
                [[p.ptr for p in obj.parts] for obj in objects],
                [[p.nbytes for p in obj.parts] for obj in objects],
            )
        for obj, rc in zip(objects, results, strict=True):
            if rc == obj.nbytes:
                continue
            if rc >= 0 or rc in (codes.INVALID_PARAMS, codes.TRANSFER_FAIL):
                self._raise_size_mismatch(obj, int(rc))
            raise codes.error_for(int(rc), "get", obj.key)

    def _raise_size_mismatch(self, obj: ObjectIO, rc: int) -> None:
        stored = int(self._store.get_size(obj.key))
        if stored >= 0 and stored != obj.nbytes:
            raise SchemaMismatchError(
                f"Mooncake object {obj.key!r} holds {stored} bytes but its specs describe "
                f"{obj.nbytes}; refusing to reinterpret it"
            )
        if rc >= 0:
            raise SchemaMismatchError(
                f"Mooncake read of {obj.key!r} returned {rc} of {obj.nbytes} bytes"
            )
        raise codes.error_for(rc, "get", obj.key)

    def remove(self, keys: Sequence[str], *, force: bool) -> RemoveReport:
        """Remove ``keys`` in one batch call and report per key; never raises for a key.

        Without ``force`` a key under a read lease is reported in ``leased`` and kept.
        """
        if not keys:
            return RemoveReport()
        results = self._live().batch_remove(list(keys), force)
        removed, absent, leased, failed = [], [], [], {}
        for key, rc in zip(keys, results, strict=True):
            if rc == codes.OK:
                removed.append(key)
            elif rc == codes.OBJECT_NOT_FOUND:
                absent.append(key)
            elif rc == codes.OBJECT_HAS_LEASE:
                leased.append(key)
            else:
                failed[key] = int(rc)
        return RemoveReport(tuple(removed), tuple(absent), tuple(leased), failed)

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key exists. Side effect: grants a read lease on every existing key."""
        if not keys:
            return []
        results = self._live().batch_is_exist(list(keys))
        out = []
        for key, rc in zip(keys, results, strict=True):
            if rc < 0:
                raise codes.error_for(int(rc), "existence check", key)
            out.append(rc == 1)
        return out

    def sizes(self, keys: Sequence[str]) -> list[int]:
        """Each object's stored size in bytes, or a negative Mooncake code when it is absent.

        Side effect: like :meth:`exists`, the master may grant a read lease on existing keys.
        """
        store = self._live()
        return [int(store.get_size(key)) for key in keys]

    def object_bytes(self, key: str) -> bytes:
        """The whole stored object (a copy). For diagnosing a refused read only: it takes a read
        lease and copies through Python memory.
        """
        store = self._live()
        size = int(store.get_size(key))
        if size < 0:
            raise codes.error_for(size, "size query", key)
        buffer = bytearray(size)
        view = memoryview(buffer)
        address = ctypes.addressof(ctypes.c_char.from_buffer(buffer)) if size else 0
        with self._registrations.held([Region(address, size)]):
            rc = int(store.get_into(key, address, size)) if size else 0
        view.release()
        if rc != size:
            raise codes.error_for(rc if rc < 0 else codes.TRANSFER_FAIL, "get", key)
        return bytes(buffer)

    def remove_matching(self, pattern: str, *, force: bool) -> int:
        """Remove every key matching the (ECMAScript) regular expression; return how many."""
        removed = int(self._live().remove_by_regex(pattern, force))
        if removed < 0:
            raise codes.error_for(removed, "remove by pattern", pattern)
        return removed

    def healthy(self) -> bool:
        """True while the client is set up and the master answers its heartbeat."""
        return not self._closed and self._store.health_check() == 0

    @property
    def binding(self) -> Any:
        """The underlying ``MooncakeDistributedStore`` (for benchmarks measuring bare calls)."""
        return self._live()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Unmount this client's segment (objects stored in it die with it); idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._store.close()
