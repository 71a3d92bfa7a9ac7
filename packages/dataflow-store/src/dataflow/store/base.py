"""The contract's bookkeeping, written once: every backend subclasses :class:`BookkeepingStore`.

A backend supplies only raw byte I/O for one generation of one sample (the ``_write``,
``_read``, ``_delete`` hooks below, plus a few optional ones); this class owns everything the
:class:`~dataflow.contracts.FeatureStore` contract promises about lifetimes:

- **Generations.** Every ``put`` of a sample id gets a new generation, strictly greater than any
  this store handed out before (``_next_generation``); older generations' bytes are freed
  (for shared backends, also those another process left).
  A ref or handle to an older generation is stale: ``get`` raises ``StaleGenerationError`` and
  ``release`` of it never frees newer data.
- **Tombstones.** A freed generation is refused by ``get`` at once (``NotFoundError``), even
  while a backend still holds its bytes (a failed free waiting for ``gc`` to retry it).
- **Leases.** Each ``get`` hands out a lease with a unique token. In consume-once mode the last
  lease on the current generation frees it; with ``retain_on_release=True`` only ``abort`` and
  ``gc`` free. ``release`` and ``abort`` are idempotent.
- **Budget.** With ``budget_bytes`` set, a ``put`` that would take resident + reserved bytes
  past it raises ``CapacityExceededError`` before any byte is written and changes nothing; the
  check and the reservation are one step under the store lock.
- **Age and retries.** ``gc()`` frees unleased samples older than ``max_age_s`` and retries frees
  that failed (kept as *pending* and counted as resident until they succeed; never dropped).
- **Threads.** One lock guards the bookkeeping; byte I/O runs outside it, so threads putting,
  getting and releasing different samples proceed in parallel.
- **health()** reports this instance's view; after everything is aborted (and frees succeeded)
  it is exactly the baseline of a fresh store.

Backend hooks (all called without the store lock held, except ``_next_generation``,
``_generations`` and ``_exists``, which run under it and must be quick):

=============================================  ===============================================
``_write(sample_id, generation, sample)``      store a :class:`PreparedSample` (CPU, contiguous
                                               tensors + specs); on failure leave nothing, raise
``_read(sample_id, generation, wanted)``       return ``{name: tensor}`` for the wanted specs;
                                               ``NotFoundError`` if absent, ``SchemaMismatchError``
                                               if the stored dtype/shape disagree
``_delete(stored: Generation)``                free one generation (names included); already
                                               gone = success; raise on failure (parked, retried)
``_exists(sid, gen)`` / ``_generations(sid)``  shared backends: what any process can still see
``_next_generation(sid)``                      default: a per-instance counter from 1
``_reclaim_orphans()``                         ``gc`` extra: free bytes of dead owners
``_check_access()``                            auth, called first by every public operation
``_close_backend()``                           release connections, maps, file handles
=============================================  ===============================================

Foreign writers (:mod:`dataflow.store.staging`): ``reserve`` / ``stage`` / ``staged_tensors`` /
``adopt`` let another process write a generation the producer reserved and the producer commit
it without a put. Backends that support it (``staging = True``) implement ``_write_staged``,
``_check_staged``, ``_read_staged``, ``_promote`` and ``_drop_staged``.

Backends whose bytes other processes can see (``shared = True``: ``shm://``, ``dir://``) also
implement ``_exists`` and ``_generations`` so that a consumer process can get and free a sample
it never put, a stale ref is detected across processes, and a producer notices samples its
consumers already freed (checked before a budgeted put, in ``gc()`` and in ``health()``).
"""

from __future__ import annotations

import abc
import functools
import itertools
import logging
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dataflow.contracts import (
    BackendUnavailableError,
    ClosedError,
    FeatureHandle,
    FeatureSpec,
    FrozenDict,
    GcReport,
    InvalidInputError,
    NotFoundError,
    SampleRef,
    StaleGenerationError,
    StoreHealth,
)
from dataflow.contracts.checks import is_int
from dataflow.contracts.errors import CapacityExceededError
from dataflow.contracts.frozen import freeze_map
from dataflow.contracts.ids import validate_sample_id
from dataflow.contracts.uris import ParsedURI, parse_store_uri
from dataflow.store.faults import FaultInjector
from dataflow.store.staging import StagedWrite, check_generation, checked_specs, parse_steward
from dataflow.store.tensors import (
    PreparedSample,
    empty_like_spec,
    jsonable_metadata,
    prepare_tensors,
)

_log = logging.getLogger(__name__)

Clock = Callable[[], float]


def _ref_metadata(metadata: object) -> tuple[FrozenDict, int]:
    """A put's metadata, deep-frozen and checked (JSON values only), and its ``num_tokens``."""
    frozen = freeze_map(jsonable_metadata(metadata), "SampleRef.metadata")
    num_tokens = frozen.get("num_tokens", 0)
    if not is_int(num_tokens):
        raise InvalidInputError(f"metadata['num_tokens'] must be an int, got {num_tokens!r}")
    if num_tokens < 0:
        raise InvalidInputError(f"SampleRef.num_tokens must be >= 0, got {num_tokens}")
    return frozen, num_tokens  # type: ignore[return-value]  # freeze_map returns a FrozenDict


@functools.lru_cache(maxsize=256)
def _store_of(uri: str) -> tuple[str, str]:
    """``(scheme, location)`` of a store URI, parsed once per distinct URI (a bad one raises
    every time: errors are not cached).
    """
    parsed = parse_store_uri(uri)
    return parsed.scheme, parsed.location


@dataclass(frozen=True)
class Generation:
    """What the bookkeeping knows of one stored generation: enough for a backend to free it."""

    sample_id: str
    generation: int
    nbytes: int
    names: tuple[str, ...]
    """Feature names; empty when unknown (an abort of a sample another process put)."""
    born: float = 0.0


@dataclass
class _Pending:
    stored: Generation
    attempts: int
    error: str


@dataclass(frozen=True)
class StoreOptions:
    """The options every backend accepts (``open_store(uri, **options)``), validated."""

    budget_bytes: int | None = None
    max_age_s: float | None = None
    retain_on_release: bool = False

    def __post_init__(self) -> None:
        if self.budget_bytes is not None and (
            isinstance(self.budget_bytes, bool)
            or not isinstance(self.budget_bytes, int)
            or self.budget_bytes < 0
        ):
            raise InvalidInputError(
                f"budget_bytes must be an int >= 0 or None, got {self.budget_bytes!r}"
            )
        if self.max_age_s is not None and (
            isinstance(self.max_age_s, bool)
            or not isinstance(self.max_age_s, (int, float))
            or not self.max_age_s >= 0
        ):
            raise InvalidInputError(
                f"max_age_s must be a number >= 0 or None, got {self.max_age_s!r}"
            )
        if not isinstance(self.retain_on_release, bool):
            raise InvalidInputError(
                f"retain_on_release must be a bool, got {self.retain_on_release!r}"
            )


class BookkeepingStore(abc.ABC):
    """A FeatureStore whose lifetime rules live here and whose bytes live in a backend.

    Subclasses set ``backend`` (the health label) and implement the byte hooks. The constructor
    takes the parsed URI plus the common options (see :class:`StoreOptions`), ``clock`` (a
    monotonic clock, injectable for age tests) and ``faults`` (a test-only
    :class:`~dataflow.store.faults.FaultInjector`).
    """

    backend: str = "abstract"
    shared: bool = False
    staging: bool = False
    """Whether another process can write a reserved generation for ``adopt`` (see
    :mod:`dataflow.store.staging`)."""
    tombstone_capacity: int = 1 << 16
    """Most recently freed sample ids remembered, bounding bookkeeping over a long run."""

    def __init__(
        self,
        parsed: ParsedURI,
        *,
        budget_bytes: int | None = None,
        max_age_s: float | None = None,
        retain_on_release: bool = False,
        clock: Clock = time.monotonic,
        faults: FaultInjector | None = None,
    ) -> None:
        self.options = StoreOptions(budget_bytes, max_age_s, retain_on_release)
        self._parsed = parsed
        self._uri = f"{parsed.scheme}://{parsed.location}"
        self._clock = clock
        self._faults = faults
        self._lock = threading.RLock()
        self._closed = False
        self._last_generation = 0
        self._tokens = itertools.count(1)
        self._nonce = secrets.token_hex(4)  # handles of two instances never share a token
        self._resident: dict[str, Generation] = {}
        self._leases: dict[str, FeatureHandle] = {}
        self._lease_counts: Counter[tuple[str, int]] = Counter()
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._freed_through: OrderedDict[str, int] = OrderedDict()
        self._reserved = 0

    # ----------------------------------------------------------------- backend hooks

    @abc.abstractmethod
    def _write(self, sample_id: str, generation: int, sample: PreparedSample) -> None:
        """Store one generation's tensors; on failure leave nothing behind and raise."""

    @abc.abstractmethod
    def _read(
        self, sample_id: str, generation: int, wanted: Mapping[str, FeatureSpec]
    ) -> dict[str, torch.Tensor]:
        """Return the wanted tensors of one generation.

        Raise ``NotFoundError`` if the generation is not stored and ``SchemaMismatchError`` if
        the stored bytes disagree with ``wanted``.
        """

    @abc.abstractmethod
    def _delete(self, stored: Generation) -> None:
        """Free one generation's bytes. Already gone counts as success; raise on failure."""

    def _exists(self, sample_id: str, generation: int) -> bool:
        """Whether the backend still holds this generation (shared backends)."""
        return True

    def _generations(self, sample_id: str) -> list[int]:
        """Every generation of ``sample_id`` the backend holds, for any process (shared backends)."""
        return []

    def _next_generation(self, sample_id: str) -> int:
        """A generation greater than any this store (or, shared, any process) handed out."""
        self._last_generation += 1
        return self._last_generation

    def _reclaim_orphans(self) -> tuple[int, int]:
        """Free bytes whose owner is gone (e.g. a dead producer); return (samples, bytes)."""
        return 0, 0

    def _write_staged(
        self, sample_id: str, generation: int, sample: PreparedSample, steward: str
    ) -> None:
        """Write one staged generation (invisible to ``get``) atomically; leave nothing on error."""
        raise InvalidInputError(self._no_staging())

    def _staged_writer(
        self, sample_id: str, generation: int, specs: dict[str, FeatureSpec], steward: str
    ) -> StagedWrite:
        """Writable tensors for ``stage_writer``; by default private memory, staged on publish
        through ``_write_staged`` (backends that can map the staged place override this).
        """
        tensors = {name: empty_like_spec(spec) for name, spec in specs.items()}
        nbytes = sum(spec.nbytes for spec in specs.values())

        def publish() -> None:
            self._write_staged(
                sample_id, generation, PreparedSample(tensors, specs, nbytes), steward
            )

        return StagedWrite(tensors, publish, lambda: None)

    def _check_staged(
        self, sample_id: str, generation: int, specs: Mapping[str, FeatureSpec]
    ) -> None:
        """Raise ``NotFoundError`` if nothing is staged there, ``SchemaMismatchError`` if the
        staged features are not exactly ``specs``.
        """
        raise InvalidInputError(self._no_staging())

    def _read_staged(
        self, sample_id: str, generation: int, wanted: Mapping[str, FeatureSpec]
    ) -> dict[str, torch.Tensor]:
        """Private copies of staged features (``NotFoundError`` / ``SchemaMismatchError``)."""
        raise InvalidInputError(self._no_staging())

    def _promote(self, sample_id: str, generation: int, specs: Mapping[str, FeatureSpec]) -> None:
        """Make a checked staged generation the stored one (atomically, never overwriting)."""
        raise InvalidInputError(self._no_staging())

    def _drop_staged(  # noqa: B027 (nothing is staged without staging)
        self, sample_id: str, generation: int | None = None
    ) -> None:
        """Remove the staged (unadopted) ``generation`` of ``sample_id`` (None: every one);
        already gone = fine.
        """

    def _no_staging(self) -> str:
        return (
            f"{self._uri}: a {self.backend}:// store cannot take features written by another "
            "process (use shm://, dir:// or mooncake://)"
        )

    def _check_access(self) -> None:  # noqa: B027 (optional hook; the default allows all)
        """Raise if the caller may not use the backend now (auth); called by every operation."""

    def _close_backend(self) -> None:  # noqa: B027 (optional hook; nothing to release)
        """Release backend resources (not stored samples)."""

    # ----------------------------------------------------------------- contract

    @property
    def uri(self) -> str:
        """``scheme://location``: what refs carry and ``get`` checks them against."""
        return self._uri

    def put(
        self,
        sample_id: str,
        tensors: Mapping[str, Any],
        metadata: Mapping[str, Any] | None = None,
    ) -> SampleRef:
        """Store a new generation of ``sample_id``; see the module docstring for guarantees."""
        self._enter()
        # Every untrusted value is checked here, before anything changes; the ref is then
        # assembled from checked values only (SampleRef.from_validated), so nothing is checked
        # twice.
        validate_sample_id(sample_id)
        sample = prepare_tensors(tensors)
        meta, num_tokens = _ref_metadata(metadata)
        with self._lock:
            self._check_budget(sample_id, sample.nbytes)
            generation = self._next_generation(sample_id)
            self._reserved += sample.nbytes
        try:
            self._write(sample_id, generation, sample)
        finally:
            with self._lock:
                self._reserved -= sample.nbytes
        self._publish(Generation(sample_id, generation, sample.nbytes, tuple(sample.specs)))
        return self._make_ref(sample_id, generation, sample, meta, num_tokens)

    # ----------------------------------------------------------------- foreign writers

    def reserve(self, sample_id: str) -> int:
        """A generation of ``sample_id`` for another process to ``stage`` into: by the rule of
        ``put``, greater than any this store (or, shared, any process) handed out.
        """
        self._enter()
        validate_sample_id(sample_id)
        if not self.staging:
            raise InvalidInputError(self._no_staging())
        with self._lock:
            return self._next_generation(sample_id)

    def stage(
        self, sample_id: str, generation: int, tensors: Mapping[str, Any], *, steward: str
    ) -> dict[str, FeatureSpec]:
        """Write ``tensors`` as the staged (not yet stored) ``generation`` of ``sample_id`` for
        ``steward`` (the producer that reserved it) to adopt; return their specs.

        Called in the writing process; this instance's bookkeeping does not change (the
        steward's adoption makes the sample stored). Refuses (``InvalidInputError``, nothing
        written) a malformed steward or generation, bad tensors, or a store without staging.
        """
        self._enter()
        validate_sample_id(sample_id)
        generation = check_generation(sample_id, generation, "stage")
        parse_steward(steward)
        if not self.staging:
            raise InvalidInputError(self._no_staging())
        sample = prepare_tensors(tensors)
        self._write_staged(sample_id, generation, sample, steward)
        return dict(sample.specs)

    def stage_writer(
        self,
        sample_id: str,
        generation: int,
        specs: Mapping[str, FeatureSpec],
        *,
        steward: str,
    ) -> StagedWrite:
        """Stage by writing in place: writable, uninitialised tensors of ``specs``, staged as
        ``generation`` of ``sample_id`` for ``steward`` on ``publish()``
        (:class:`~dataflow.store.staging.StagedWrite`); the same refusals as ``stage``, before
        anything is written. On ``shm://`` the tensors view the staged segment (no copy at
        publish); elsewhere they are private memory written out at publish.
        """
        self._enter()
        validate_sample_id(sample_id)
        generation = check_generation(sample_id, generation, "stage_writer")
        parse_steward(steward)
        wanted = checked_specs(sample_id, specs, "stage_writer")
        if not self.staging:
            raise InvalidInputError(self._no_staging())
        return self._staged_writer(sample_id, generation, wanted, steward)

    def staged_tensors(
        self, sample_id: str, generation: int, specs: Mapping[str, FeatureSpec]
    ) -> dict[str, torch.Tensor]:
        """Private copies of staged features (e.g. token ids to compare before adopting);
        ``NotFoundError`` if nothing is staged there, ``SchemaMismatchError`` if the staged
        features differ from ``specs``. Changes nothing.
        """
        self._enter()
        validate_sample_id(sample_id)
        generation = check_generation(sample_id, generation, "staged_tensors")
        wanted = checked_specs(sample_id, specs, "staged_tensors")
        if not self.staging:
            raise InvalidInputError(self._no_staging())
        return self._read_staged(sample_id, generation, wanted)

    def unstage(self, sample_id: str, generation: int) -> None:
        """Remove the staged, unadopted ``generation`` of ``sample_id`` (a capture its producer
        refused); idempotent; stored generations are never touched.
        """
        self._enter()
        validate_sample_id(sample_id)
        generation = check_generation(sample_id, generation, "unstage")
        if not self.staging:
            raise InvalidInputError(self._no_staging())
        self._drop_staged(sample_id, generation)

    def adopt(
        self,
        sample_id: str,
        generation: int,
        specs: Mapping[str, FeatureSpec],
        metadata: Mapping[str, Any] | None = None,
    ) -> SampleRef:
        """Commit the staged ``generation`` of ``sample_id`` as stored, without a put; return
        its ref (as ``put`` would).

        Checks, before anything changes: something is staged there (``NotFoundError``), its
        features are exactly ``specs`` (``SchemaMismatchError``), the generation is not stale or
        freed (as ``get``: a newer generation exists → ``StaleGenerationError``) and fits the
        budget (``CapacityExceededError``). A refused adoption leaves the staged bytes where they
        are (``abort(sample_id)`` removes them; so does ``gc`` once their steward is dead).
        """
        self._enter()
        validate_sample_id(sample_id)
        generation = check_generation(sample_id, generation, "adopt")
        wanted = checked_specs(sample_id, specs, "adopt")
        if not self.staging:
            raise InvalidInputError(self._no_staging())
        meta, num_tokens = _ref_metadata(metadata)
        nbytes = sum(spec.nbytes for spec in wanted.values())
        with self._lock:
            self._check_live(sample_id, generation, staged=True)
            newer = [g for g in self._generations(sample_id) if g > generation]
            if newer:
                raise StaleGenerationError(
                    f"{self._uri}: staged generation {generation} of {sample_id!r} is stale; "
                    f"generation {max(newer)} is stored"
                )
        self._check_staged(sample_id, generation, wanted)
        with self._lock:
            self._check_budget(sample_id, nbytes)
            self._reserved += nbytes
            self._last_generation = max(self._last_generation, generation)
        try:
            self._promote(sample_id, generation, wanted)
        finally:
            with self._lock:
                self._reserved -= nbytes
        self._publish(Generation(sample_id, generation, nbytes, tuple(wanted)))
        return self._make_ref(
            sample_id, generation, PreparedSample({}, wanted, nbytes), meta, num_tokens
        )

    def get(
        self, ref: SampleRef, names: Sequence[str] | None = None
    ) -> tuple[dict[str, Any], FeatureHandle]:
        """Return the named tensors of ``ref`` (all when None) and a lease on them."""
        self._enter()
        wanted = self._wanted(ref, names)
        sid, generation = ref.sample_id, ref.generation
        token = f"{sid}:{generation}:{self._nonce}:{next(self._tokens)}"
        # The ref's id and generation were checked when the ref was made; the token is ours.
        handle = FeatureHandle.from_validated(sid, generation, token)
        with self._lock:
            self._check_live(sid, generation)
            self._add_lease(handle)
        try:
            tensors = self._read(sid, generation, wanted)
        except NotFoundError:
            # A put may have replaced this generation while it was being read.
            with self._lock:
                self._pop_lease(token)
                current = self._resident.get(sid)
                known = self._generations(sid) + ([current.generation] if current else [])
            newer = [g for g in known if g > generation]
            if newer:
                raise StaleGenerationError(
                    f"{self._uri}: ref to sample {sid!r} generation {generation} is stale; "
                    f"generation {max(newer)} replaced it"
                ) from None
            raise
        except BaseException:
            self._drop_lease(token)
            raise
        with self._lock:
            if token not in self._leases:
                raise NotFoundError(
                    f"{self._uri}: sample {sid!r} generation {generation} was aborted while "
                    "it was being read"
                )
            if sid not in self._resident and self.shared:
                # A consumer that never put this sample adopts it, so its last lease frees it.
                self._resident[sid] = self._adopted(ref, wanted)
            elif sid in self._resident and self._resident[sid].generation < generation:
                self._resident[sid] = self._adopted(ref, wanted)
        return tensors, handle

    def release(self, handle: FeatureHandle) -> None:
        """Return a lease; idempotent; frees the sample when it was the last one (consume-once)."""
        self._enter()
        if not isinstance(handle, FeatureHandle):
            raise InvalidInputError(f"release needs a FeatureHandle, got {type(handle).__name__}")
        with self._lock:
            lease = self._pop_lease(handle.token)
            if lease is None or self.options.retain_on_release:
                return
            key = (lease.sample_id, lease.generation)
            entry = self._resident.get(lease.sample_id)
            if entry is None or entry.generation != lease.generation or self._lease_counts[key]:
                return
            self._forget(entry)
        self._free(entry)

    def abort(self, sample_id: str, reason: str) -> None:
        """Free every generation of ``sample_id`` whatever its leases; idempotent."""
        self._enter()
        validate_sample_id(sample_id)
        if not isinstance(reason, str) or not reason:
            raise InvalidInputError("abort needs a non-empty reason")
        with self._lock:
            for token in [t for t, h in self._leases.items() if h.sample_id == sample_id]:
                self._pop_lease(token)
            entry = self._resident.pop(sample_id, None)
            victims = {g: Generation(sample_id, g, 0, ()) for g in self._generations(sample_id)}
            if entry is not None:
                victims[entry.generation] = entry
            if victims:
                self._tombstone(sample_id, max(victims))
        for _, victim in sorted(victims.items()):
            self._free(victim)
        if self.staging:
            self._drop_staged(sample_id)

    def gc(self) -> GcReport:
        """Free unleased samples past ``max_age_s``, retry failed frees, reclaim orphans."""
        self._enter()
        with self._lock:
            self._sync_with_backend()
            expired = self._expired()
            for entry in expired:
                self._forget(entry)
            retry = list(self._pending.values())
        freed = freed_bytes = 0
        for entry in expired:
            if self._free(entry):
                freed += 1
                freed_bytes += entry.nbytes
        retried = failed = 0
        for pending in retry:
            retried += 1
            if self._retry_free(pending):
                freed += 1
                freed_bytes += pending.stored.nbytes
            else:
                failed += 1
        orphans, orphan_bytes = self._reclaim_orphans()
        if freed or orphans or failed:
            _log.info(
                "%s gc: freed %d sample(s) (%d orphaned), %d byte(s); %d free(s) still failing",
                self.uri,
                freed + orphans,
                orphans,
                freed_bytes + orphan_bytes,
                failed,
            )
        return GcReport(
            freed_samples=freed + orphans,
            freed_bytes=freed_bytes + orphan_bytes,
            retried_frees=retried,
            failed_frees=failed,
        )

    def drain(self, timeout_s: float = 5.0, interval_s: float = 0.1) -> int:
        """Retry pending frees (``gc`` passes) for at most ``timeout_s``; return samples freed.

        Raises ``BackendUnavailableError`` naming the samples still pending, and why, when time
        runs out; their bookkeeping is kept, so a later ``gc()`` or ``drain()`` retries them.
        """
        if not timeout_s >= 0 or not interval_s >= 0:
            raise InvalidInputError("drain needs timeout_s >= 0 and interval_s >= 0")
        deadline = time.monotonic() + timeout_s
        freed = 0
        while True:
            report = self.gc()
            freed += report.freed_samples
            if report.failed_frees == 0:
                return freed
            if time.monotonic() >= deadline:
                break
            time.sleep(interval_s)
        with self._lock:
            stuck = sorted(self._pending.items())
        shown = "; ".join(f"{sid!r} g{gen}: {p.error}" for (sid, gen), p in stuck[:8])
        raise BackendUnavailableError(
            f"{self._uri}: {len(stuck)} free(s) still failing after {timeout_s} s ({shown})"
        )

    def health(self) -> StoreHealth:
        """Tensor-free figures of this instance's view (pending frees count as resident)."""
        self._enter()
        with self._lock:
            self._sync_with_backend()
            now = self._clock()
            ages = [now - e.born for e in self._resident.values()]
            return StoreHealth(
                backend=self.backend,
                resident_samples=len(self._resident) + len(self._pending),
                resident_bytes=self._resident_bytes(),
                active_leases=len(self._leases),
                pending_frees=len(self._pending),
                oldest_age_s=max(ages, default=0.0),
                budget_bytes=self.options.budget_bytes,
            )

    def close(self) -> None:
        """Stop serving; idempotent. Stored samples are not freed (abort them first)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._close_backend()

    def __enter__(self) -> BookkeepingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- internals

    def _enter(self) -> None:
        if self._closed:
            raise ClosedError(f"{self._uri}: the store is closed")
        self._check_access()

    def _make_ref(
        self,
        sample_id: str,
        generation: int,
        sample: PreparedSample,
        meta: FrozenDict,
        num_tokens: int,
    ) -> SampleRef:
        """The ref of a put, from values ``put`` already checked (see ``SampleRef.from_validated``)."""
        return SampleRef.from_validated(
            sample_id=sample_id,
            store_uri=self._uri,
            feature_keys=FrozenDict({n: f"{sample_id}/g{generation}/{n}" for n in sample.specs}),
            feature_specs=FrozenDict(sample.specs),
            generation=generation,
            estimated_bytes=sample.nbytes,
            num_tokens=num_tokens,
            metadata=meta,
        )

    def _wanted(self, ref: SampleRef, names: Sequence[str] | None) -> Mapping[str, FeatureSpec]:
        if not isinstance(ref, SampleRef):
            raise InvalidInputError(f"get needs a SampleRef, got {type(ref).__name__}")
        # The form this store writes needs no parsing; any other is parsed once (cached).
        if ref.store_uri != self._uri and _store_of(ref.store_uri) != (
            self._parsed.scheme,
            self._parsed.location,
        ):
            raise InvalidInputError(
                f"ref {ref.sample_id!r} belongs to store {ref.store_uri!r}, not {self._uri!r}"
            )
        if names is None:
            if not ref.feature_specs:
                raise InvalidInputError("names must not be empty (pass None for every feature)")
            return ref.feature_specs  # read-only, already checked when the ref was made
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise InvalidInputError(f"names must be a sequence of feature names, got {names!r}")
        missing = [n for n in names if n not in ref.feature_specs]
        if missing:
            raise NotFoundError(
                f"ref {ref.sample_id!r} has no feature(s) {missing}; it has {sorted(ref.feature_specs)}"
            )
        if not names:
            raise InvalidInputError("names must not be empty (pass None for every feature)")
        return {n: ref.feature_specs[n] for n in names}

    def _check_live(self, sid: str, generation: int, *, staged: bool = False) -> None:
        entry = self._resident.get(sid)
        if entry is not None and entry.generation > generation:
            raise StaleGenerationError(
                f"{self._uri}: ref to sample {sid!r} generation {generation} is stale; "
                f"generation {entry.generation} replaced it"
            )
        if (sid, generation) in self._pending or (
            generation <= self._freed_through.get(sid, -1)
            and (entry is None or entry.generation != generation)
        ):
            raise NotFoundError(
                f"{self._uri}: sample {sid!r} generation {generation} was released or aborted"
            )
        if entry is None and not self.shared and not staged:
            raise NotFoundError(
                f"{self._uri}: sample {sid!r} generation {generation} is not stored here"
            )

    def _check_budget(self, sample_id: str, nbytes: int) -> None:
        budget = self.options.budget_bytes
        if budget is None:
            return
        used = self._resident_bytes() + self._reserved
        if used + nbytes > budget:
            # Syncing only forgets entries another process freed, so it can only make room:
            # done when the put would not fit, not on every put (a check per resident sample).
            self._sync_with_backend()
            used = self._resident_bytes() + self._reserved
        if used + nbytes > budget:
            raise CapacityExceededError(
                f"{self._uri}: put of {sample_id!r} needs {nbytes} bytes but {used} of the "
                f"{budget}-byte budget are in use; nothing was written"
            )

    def _publish(self, new: Generation) -> None:
        sid = new.sample_id
        with self._lock:
            old = self._resident.get(sid)
            if old is not None and old.generation > new.generation:
                victims = {new.generation: new}  # a concurrent newer put of the same id won
            else:
                self._resident[sid] = Generation(
                    sid, new.generation, new.nbytes, new.names, self._clock()
                )
                victims = {old.generation: old} if old is not None else {}
                # Older generations another process put (shared backends) go too, so a ref to
                # one is stale everywhere, not only here.
                for g in self._generations(sid):
                    if g < new.generation:
                        victims.setdefault(g, Generation(sid, g, 0, ()))
            if victims:
                self._tombstone(sid, max(victims))
        for _, victim in sorted(victims.items()):
            self._free(victim)

    def _adopted(self, ref: SampleRef, wanted: Mapping[str, FeatureSpec]) -> Generation:
        names = tuple(ref.feature_specs) or tuple(wanted)
        return Generation(ref.sample_id, ref.generation, ref.spec_bytes, names, self._clock())

    def _add_lease(self, handle: FeatureHandle) -> None:
        self._leases[handle.token] = handle
        self._lease_counts[(handle.sample_id, handle.generation)] += 1

    def _pop_lease(self, token: str) -> FeatureHandle | None:
        handle = self._leases.pop(token, None)
        if handle is not None:
            key = (handle.sample_id, handle.generation)
            self._lease_counts[key] -= 1
            if self._lease_counts[key] <= 0:
                del self._lease_counts[key]
        return handle

    def _drop_lease(self, token: str) -> None:
        with self._lock:
            self._pop_lease(token)

    def _tombstone(self, sid: str, generation: int) -> None:
        self._freed_through[sid] = max(generation, self._freed_through.get(sid, -1))
        self._freed_through.move_to_end(sid)
        while len(self._freed_through) > self.tombstone_capacity:
            # The oldest tombstones go first: a ref that old is still refused (its bytes are
            # gone), only with "not stored" instead of "released or aborted".
            self._freed_through.popitem(last=False)

    def _forget(self, entry: Generation) -> None:
        del self._resident[entry.sample_id]
        self._tombstone(entry.sample_id, entry.generation)

    def _free(self, stored: Generation) -> bool:
        """Physically free one generation; on failure park it for ``gc`` to retry."""
        try:
            if self._faults is not None:
                self._faults.before_delete(stored.sample_id, stored.generation)
            self._delete(stored)
        except Exception as exc:  # any backend failure becomes a pending free, never a leak
            with self._lock:
                self._pending[(stored.sample_id, stored.generation)] = _Pending(
                    stored, 1, repr(exc)
                )
            return False
        return True

    def _retry_free(self, pending: _Pending) -> bool:
        stored = pending.stored
        try:
            if self._faults is not None:
                self._faults.before_delete(stored.sample_id, stored.generation)
            self._delete(stored)
        except Exception as exc:  # kept pending (never dropped): health keeps showing it
            with self._lock:
                pending.attempts += 1
                pending.error = repr(exc)
            return False
        with self._lock:
            self._pending.pop((stored.sample_id, stored.generation), None)
        return True

    def _expired(self) -> list[Generation]:
        max_age = self.options.max_age_s
        if max_age is None:
            return []
        now = self._clock()
        return [
            e
            for sid, e in self._resident.items()
            if now - e.born > max_age and not self._lease_counts[(sid, e.generation)]
        ]

    def _resident_bytes(self) -> int:
        return sum(e.nbytes for e in self._resident.values()) + sum(
            p.stored.nbytes for p in self._pending.values()
        )

    def _sync_with_backend(self) -> None:
        """Drop unleased entries whose bytes another process already freed (shared backends)."""
        if not self.shared:
            return
        for sid, entry in list(self._resident.items()):
            if not self._lease_counts[(sid, entry.generation)] and not self._exists(
                sid, entry.generation
            ):
                self._forget(entry)
