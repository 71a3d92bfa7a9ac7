"""``mooncake://host:port``: features in a Mooncake distributed store (TCP or RDMA).

Lifetimes (generations, leases, consume-once / retain, budget, tombstones, gc, pending frees)
are :class:`~dataflow.store.base.BookkeepingStore`'s; this backend adds the Mooncake parts:

- **Hard-pinned objects.** Every put is ``with_hard_pin`` (unless ``hard_pin=false``), so
  Mooncake never evicts features that are committed but not yet trained on; a full cluster
  refuses the put (``CapacityExceededError``) instead of silently dropping older samples.
- **Zero copy.** Tensors are written from their own memory and read into freshly allocated
  tensors (``batch_put_from_multi_buffers`` / ``batch_get_into_multi_buffers``), with the
  buffers registered with the transfer engine; a fetched tensor is already private to the caller.
- **The generation in every key** (:mod:`dataflow.store.mooncake_wire`). Generations are taken
  from the wall clock in microseconds, strictly increasing per instance, so a restarted
  producer never reuses a key an earlier incarnation wrote (Mooncake keeps the OLD bytes when a
  put hits an existing key); a put also refuses to write over a key that exists.
- **Logical tombstone.** A released or aborted generation is refused by ``get`` at once, even
  while Mooncake still holds its bytes (base class).
- **Lease-aware removal.** Mooncake gives every reader a read lease (10 s by default) during
  which a plain remove fails. This store never removes a generation while a read of it is in
  flight in this process (the free is parked and retried by ``gc``). Otherwise, with
  ``lease_grace_s=0`` (default) it removes with ``force`` at once — the reader that released it
  has finished its transfer, and hard pins make this store the only lifetime authority; with
  ``lease_grace_s > 0`` it first respects leases (for readers in other processes that may still
  be transferring) and forces only once the generation has been refused that long. Failed
  frees stay pending with their bookkeeping; :meth:`MooncakeFeatureStore.drain` forces them out
  within a bounded time or raises naming them.
- **Server-written features** (:mod:`dataflow.store.mooncake_external`): a capture server
  (SpecForge's patched SGLang) writes headerless objects at this store's feature keys under a
  generation from :meth:`MooncakeFeatureStore.new_generation`; :meth:`~MooncakeFeatureStore.adopt_external`
  commits them as a generation without a put (sizes checked, manifest written, ref marked
  headerless); ``get`` of such a ref reads each object straight into a tensor of the ref's spec
  and refuses one whose size differs. The same lifetimes apply as to a put.
- **Foreign writers** (:mod:`dataflow.store.staging`): a staged generation is its feature
  objects (this store's own self-describing format) without the manifest, so ``get`` never
  finds it; ``adopt`` checks each object's size and writes the manifest. The objects live in
  the writer's segment; an unadopted one is removed by ``abort``.
- **Setup timeout.** Connecting checks the master's port and probes the handshake in a child
  process first (:mod:`dataflow.store.mooncake_connect`): a missing master is a
  ``BackendUnavailableError`` in seconds, never a minute-long hang.

Across processes: a consumer can get (and, by releasing, free) a sample another process put; an
abort of a sample this instance never saw removes every generation of it from the cluster.
A stale ref whose bytes another process already replaced reads as ``NotFoundError`` there (not
its ``StaleGenerationError`` subclass): Mooncake cannot list a sample's generations.

Options: the common ones, plus ``client`` (a connected
:class:`~dataflow.store.mooncake_client.MooncakeClient` to borrow; the store then never closes
it), ``lease_grace_s`` and the connection options of
:mod:`dataflow.store.mooncake_settings` (also accepted in the URI's query string).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from dataflow.contracts import (
    BackendUnavailableError,
    CorruptRecordError,
    DataflowError,
    FeatureHandle,
    FeatureSpec,
    InvalidInputError,
    NotFoundError,
    SampleRef,
    SchemaMismatchError,
)
from dataflow.contracts.checks import is_number
from dataflow.contracts.ids import validate_sample_id
from dataflow.contracts.uris import ParsedURI
from dataflow.store import mooncake_external as external
from dataflow.store import mooncake_wire as wire
from dataflow.store.base import BookkeepingStore, Generation
from dataflow.store.mooncake_client import MooncakeClient, ObjectIO, Region
from dataflow.store.mooncake_settings import settings_from_uri
from dataflow.store.staging import checked_specs
from dataflow.store.tensors import PreparedSample, describe, empty_like_spec, jsonable_metadata

_STORE_OPTIONS = ("budget_bytes", "max_age_s", "retain_on_release", "clock", "faults")


def _region(tensor: torch.Tensor) -> Region:
    return Region(int(tensor.data_ptr()), tensor.numel() * tensor.element_size())


def _buffer(data: bytes) -> torch.Tensor:
    """``data`` in a tensor's memory, so it has a stable address for the transfer engine."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0)


class MooncakeFeatureStore(BookkeepingStore):
    """Feature store in a Mooncake cluster (``mooncake://host:port``); see the module docstring."""

    backend = "mooncake"
    shared = True
    staging = True

    def __init__(
        self,
        parsed: ParsedURI,
        *,
        client: MooncakeClient | None = None,
        lease_grace_s: float = 0.0,
        **options: Any,
    ) -> None:
        common = {k: options.pop(k) for k in _STORE_OPTIONS if k in options}
        if not is_number(lease_grace_s):
            raise InvalidInputError(f"lease_grace_s must be a number >= 0, got {lease_grace_s!r}")
        if not lease_grace_s >= 0:
            raise InvalidInputError(f"lease_grace_s must be a number >= 0, got {lease_grace_s!r}")
        settings = settings_from_uri(parsed.uri, options)  # refuses unknown options by name
        super().__init__(parsed, **common)
        if client is not None and not isinstance(client, MooncakeClient):
            raise InvalidInputError(f"client must be a MooncakeClient, got {type(client).__name__}")
        if client is not None and client.settings.master_address != settings.master_address:
            raise InvalidInputError(
                f"client is connected to {client.settings.master_address}, but the store URI "
                f"names {settings.master_address}"
            )
        self._owns_client = client is None
        self.client = client if client is not None else MooncakeClient.connect(settings)
        self.lease_grace_s = float(lease_grace_s)
        self._io_lock = threading.Lock()
        self._reading: Counter[tuple[str, int]] = Counter()
        self._refused_since: dict[tuple[str, int], float] = {}
        self._last_error: dict[tuple[str, int], str] = {}
        self._forcing = threading.local()
        self._layout = threading.local()  # .raw: the get on this thread reads headerless objects

    # ----------------------------------------------------------------- generations

    def _next_generation(self, sample_id: str) -> int:
        # Wall-clock microseconds: a restarted process (same sample ids, fresh counter) still
        # never reuses a key an earlier incarnation may have left in the cluster.
        self._last_generation = max(self._last_generation + 1, time.time_ns() // 1000)
        return self._last_generation

    def _exists(self, sample_id: str, generation: int) -> bool:
        # Unknown counts as present: bookkeeping is only dropped on proof the bytes are gone,
        # and health() keeps answering (from this instance's records) while the master is down.
        if not self.client.healthy():
            return True
        try:
            found = self.client.exists([wire.manifest_key(sample_id, generation)])[0]
        except BackendUnavailableError:
            return True
        if not found:  # freed by another process: nothing of ours left to retry
            self._forget_refusal((sample_id, generation))
        return found

    # ----------------------------------------------------------------- server-written

    def new_generation(self, sample_id: str) -> int:
        """A generation under which a writer outside this process (a capture server) writes
        ``sample_id``: by the rule of ``put``, greater than any this instance handed out and
        never reused after a restart (wall-clock microseconds).
        """
        self._enter()
        validate_sample_id(sample_id)
        with self._lock:
            return self._next_generation(sample_id)

    def adopt_external(
        self,
        sample_id: str,
        generation: int,
        specs: Mapping[str, FeatureSpec],
        metadata: Mapping[str, Any] | None = None,
    ) -> SampleRef:
        """Commit, without a put, the headerless objects a capture server wrote at this store's
        feature keys ``dataflow/<sample_id>/g<generation>/<name>``; return their ref.

        Checks, before anything changes: every object exists (``NotFoundError``) and holds
        exactly ``numel * itemsize`` bytes of its spec (``SchemaMismatchError``); the generation
        is not already adopted (``CorruptRecordError``), not stale or freed (as ``get``) and fits
        the budget (``CapacityExceededError``). A refused adoption leaves the objects where the
        server put them (``abort(sample_id)`` removes them). Then it writes the manifest
        (marked headerless), and the generation lives by the same rules as a put one; the ref's
        ``metadata`` carries ``mooncake_layout: raw``.
        """
        self._enter()
        validate_sample_id(sample_id)
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
            raise InvalidInputError(
                f"adopt_external of {sample_id!r}: generation must be an int >= 1, "
                f"got {generation!r}"
            )
        wanted = checked_specs(sample_id, specs, "adopt_external")
        meta = {**jsonable_metadata(metadata), external.LAYOUT_KEY: external.RAW}
        num_tokens = meta.get("num_tokens", 0)
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
            raise InvalidInputError(f"metadata['num_tokens'] must be an int, got {num_tokens!r}")
        manifest = wire.manifest_key(sample_id, generation)
        if self.client.exists([manifest])[0]:
            raise CorruptRecordError(
                f"{self.uri}: generation {generation} of {sample_id!r} is already adopted "
                f"(its manifest {manifest!r} exists)"
            )
        keys = [wire.feature_key(sample_id, generation, n) for n in wanted]
        external.check_sizes(keys, list(wanted.values()), self.client.sizes(keys), self.uri)
        nbytes = sum(spec.nbytes for spec in wanted.values())
        with self._lock:
            self._check_live(sample_id, generation)
            self._check_budget(sample_id, nbytes)
            self._last_generation = max(self._last_generation, generation)
        blob = _buffer(wire.manifest_bytes(sample_id, generation, list(wanted), external.RAW))
        self.client.put([ObjectIO(manifest, (_region(blob),))])
        self._publish(Generation(sample_id, generation, nbytes, tuple(wanted)))
        return SampleRef(
            sample_id=sample_id,
            store_uri=self.uri,
            feature_keys={n: f"{sample_id}/g{generation}/{n}" for n in wanted},
            feature_specs=wanted,
            generation=generation,
            estimated_bytes=nbytes,
            num_tokens=num_tokens,
            metadata=meta,
        )

    def get(
        self, ref: SampleRef, names: Sequence[str] | None = None
    ) -> tuple[dict[str, Any], FeatureHandle]:
        """As the base class; a headerless ref (``adopt_external``) is read without headers."""
        raw = isinstance(ref, SampleRef) and external.layout_of(ref) == external.RAW
        self._layout.raw = raw
        try:
            return super().get(ref, names)
        finally:
            self._layout.raw = False

    def _read_raw(
        self, sample_id: str, generation: int, wanted: Mapping[str, FeatureSpec]
    ) -> dict[str, torch.Tensor]:
        tensors = {name: empty_like_spec(spec) for name, spec in wanted.items()}
        objects = [
            ObjectIO(wire.feature_key(sample_id, generation, name), (_region(tensors[name]),))
            for name in wanted
        ]
        with self._read_in_flight(sample_id, generation):
            try:
                self.client.get(objects)
            except SchemaMismatchError as exc:
                shown = ", ".join(f"{n}: {describe(s)}" for n, s in wanted.items())
                raise SchemaMismatchError(
                    f"{self.uri}: headerless (server-written) features of {sample_id!r} "
                    f"generation {generation} disagree with the ref ({shown}): {exc}"
                ) from None
        return tensors

    # ----------------------------------------------------------------- staging

    def _write_staged(
        self, sample_id: str, generation: int, sample: PreparedSample, steward: str
    ) -> None:
        self._write(sample_id, generation, sample, manifest=False)

    def _check_staged(
        self, sample_id: str, generation: int, specs: Mapping[str, FeatureSpec]
    ) -> None:
        manifest = wire.manifest_key(sample_id, generation)
        if self.client.exists([manifest])[0]:
            raise CorruptRecordError(
                f"{self.uri}: generation {generation} of {sample_id!r} is already stored (its "
                f"manifest {manifest!r} exists); not adopting twice"
            )
        keys = [wire.feature_key(sample_id, generation, n) for n in specs]
        for key, spec, size in zip(keys, specs.values(), self.client.sizes(keys), strict=True):
            header = len(wire.feature_header(sample_id, generation, spec))
            if size < 0:
                raise NotFoundError(
                    f"{self.uri}/{key}: nothing is staged there (wrong generation or sample, "
                    "never written, or aborted)"
                )
            if size != header + spec.nbytes:
                raise SchemaMismatchError(
                    f"{self.uri}/{key}: the staged object holds {size} bytes, but feature "
                    f"{spec.name!r} as {describe(spec)} takes {header} + {spec.nbytes}"
                )

    def _read_staged(
        self, sample_id: str, generation: int, wanted: Mapping[str, FeatureSpec]
    ) -> dict[str, torch.Tensor]:
        return self._read(sample_id, generation, wanted)

    def _promote(self, sample_id: str, generation: int, specs: Mapping[str, FeatureSpec]) -> None:
        blob = _buffer(wire.manifest_bytes(sample_id, generation, list(specs)))
        self.client.put([ObjectIO(wire.manifest_key(sample_id, generation), (_region(blob),))])

    def _drop_staged(self, sample_id: str, generation: int | None = None) -> None:
        if generation is None:
            # abort: a sample this instance does not know is removed by key pattern there
            # (staged generations included); a known one's frees keep their lease rules.
            return
        if self.client.exists([wire.manifest_key(sample_id, generation)])[0]:
            return  # adopted: stored generations go through release / abort
        self.client.remove_matching(wire.generation_pattern(sample_id, generation), force=True)

    # ----------------------------------------------------------------- bytes

    def _write(
        self, sample_id: str, generation: int, sample: PreparedSample, *, manifest: bool = True
    ) -> None:
        manifest_key = wire.manifest_key(sample_id, generation)
        # The manifest (stored) and every feature key (staged, or a torn write): Mooncake keeps
        # the old bytes of a key written twice, so a second write must be refused, not ignored.
        keys = [manifest_key, *(wire.feature_key(sample_id, generation, n) for n in sample.specs)]
        taken = [key for key, found in zip(keys, self.client.exists(keys), strict=True) if found]
        if taken:
            raise CorruptRecordError(
                f"{self.uri}: key {taken[0]!r} already exists; refusing to write generation "
                f"{generation} of {sample_id!r} over it (Mooncake would keep the old bytes)"
            )
        keep_alive = [_buffer(wire.manifest_bytes(sample_id, generation, list(sample.specs)))]
        objects = [ObjectIO(manifest_key, (_region(keep_alive[0]),))] if manifest else []
        for name, spec in sample.specs.items():
            header = _buffer(wire.feature_header(sample_id, generation, spec))
            keep_alive.append(header)
            objects.append(
                ObjectIO(
                    wire.feature_key(sample_id, generation, name),
                    (_region(header), _region(sample.tensors[name])),
                )
            )
        self.client.put(objects)
        del keep_alive

    def _read(
        self, sample_id: str, generation: int, wanted: Mapping[str, FeatureSpec]
    ) -> dict[str, torch.Tensor]:
        if getattr(self._layout, "raw", False):
            return self._read_raw(sample_id, generation, wanted)
        tensors = {name: empty_like_spec(spec) for name, spec in wanted.items()}
        expected = {
            name: wire.feature_header(sample_id, generation, spec) for name, spec in wanted.items()
        }
        headers = {name: _buffer(b"\0" * len(h)) for name, h in expected.items()}
        objects = [
            ObjectIO(
                wire.feature_key(sample_id, generation, name),
                (_region(headers[name]), _region(tensors[name])),
            )
            for name in wanted
        ]
        with self._read_in_flight(sample_id, generation):
            try:
                self.client.get(objects)
            except SchemaMismatchError:
                self._explain_size_mismatch(sample_id, generation, wanted)
                raise
            for obj, (name, spec) in zip(objects, wanted.items(), strict=True):
                got = headers[name].numpy().tobytes()
                if got != expected[name]:
                    wire.explain_mismatch(
                        got, obj.nbytes, sample_id, generation, spec, f"{self.uri}/{obj.key}"
                    )
        return tensors

    def _explain_size_mismatch(
        self, sample_id: str, generation: int, wanted: Mapping[str, FeatureSpec]
    ) -> None:
        for name, spec in wanted.items():
            key = wire.feature_key(sample_id, generation, name)
            blob = self.client.object_bytes(key)
            expected = wire.feature_header(sample_id, generation, spec)
            if len(blob) != len(expected) + spec.nbytes or not blob.startswith(expected):
                wire.explain_mismatch(
                    blob, len(blob), sample_id, generation, spec, f"{self.uri}/{key}"
                )

    @contextmanager
    def _read_in_flight(self, sample_id: str, generation: int) -> Iterator[None]:
        key = (sample_id, generation)
        with self._io_lock:
            self._reading[key] += 1
        try:
            yield
        finally:
            with self._io_lock:
                self._reading[key] -= 1
                if self._reading[key] <= 0:
                    del self._reading[key]

    # ----------------------------------------------------------------- removal

    def _delete(self, stored: Generation) -> None:
        sid, generation = stored.sample_id, stored.generation
        key = (sid, generation)
        manifest = wire.manifest_key(sid, generation)
        names = stored.names or self._names_from_manifest(manifest)
        features = [wire.feature_key(sid, generation, n) for n in names]
        force = self._force_now(key)
        # The check and the remove are one step under the I/O lock, which every read takes to
        # register itself before its transfer: no read of ours can start in between.
        with self._io_lock:
            reading = self._reading[key] > 0
            report = None if reading else self.client.remove(features, force=force)
        if report is None:
            self._refuse(key, "a read of it is in flight in this process")
        elif not report.complete:
            self._refuse(key, report.describe())
        gone = self.client.remove([manifest], force=True)  # only probed, never transferred
        if not gone.complete:
            self._refuse(key, f"manifest: {gone.describe()}")
        self._forget_refusal(key)

    def _forget_refusal(self, key: tuple[str, int]) -> None:
        with self._io_lock:
            self._refused_since.pop(key, None)
            self._last_error.pop(key, None)

    def _names_from_manifest(self, manifest: str) -> tuple[str, ...]:
        try:
            return wire.manifest_names(self.client.object_bytes(manifest), manifest)
        except NotFoundError:
            return ()

    def _force_now(self, key: tuple[str, int]) -> bool:
        if self.lease_grace_s == 0 or getattr(self._forcing, "on", False):
            return True
        with self._io_lock:
            since = self._refused_since.get(key)
        return since is not None and self._clock() - since >= self.lease_grace_s

    def _refuse(self, key: tuple[str, int], why: str) -> None:
        """Record why a free could not finish and raise, so the base class parks it."""
        with self._io_lock:
            self._refused_since.setdefault(key, self._clock())
            self._last_error[key] = why
        raise DataflowError(f"{self.uri}: cannot free {key[0]!r} generation {key[1]} yet: {why}")

    def abort(self, sample_id: str, reason: str) -> None:
        """Free every generation of ``sample_id`` whatever its leases (see the base class).

        A sample this instance has no record of (put and read elsewhere) is removed from the
        whole cluster, every generation, by key pattern.
        """
        with self._lock:
            known = sample_id in self._resident or any(k[0] == sample_id for k in self._pending)
        super().abort(sample_id, reason)
        if not known:
            self.client.remove_matching(wire.sample_pattern(sample_id), force=True)

    def drain(self, timeout_s: float = 5.0, interval_s: float = 0.1) -> int:
        """Force out every pending free, retrying for at most ``timeout_s``; return how many
        samples its ``gc()`` passes freed.

        Raises ``BackendUnavailableError`` naming the samples still pending (and why) when time
        runs out; their bookkeeping is kept, so ``gc()`` or another ``drain`` retries them.
        """
        if not timeout_s >= 0 or not interval_s >= 0:
            raise InvalidInputError("drain needs timeout_s >= 0 and interval_s >= 0")
        deadline = time.monotonic() + timeout_s
        freed = 0
        failure = ""
        self._forcing.on = True
        try:
            while True:
                try:
                    report = self.gc()
                except DataflowError as exc:  # e.g. the master is gone: keep trying until due
                    failure = f"gc failed: {exc}"
                else:
                    freed += report.freed_samples
                    if report.failed_frees == 0:
                        return freed
                    failure = f"{report.failed_frees} free(s) still failing"
                if time.monotonic() >= deadline:
                    break
                time.sleep(interval_s)
        finally:
            self._forcing.on = False
        with self._io_lock:
            stuck = sorted(self._last_error.items())[:16]
        listed = "; ".join(f"{sid!r} generation {gen}: {why}" for (sid, gen), why in stuck)
        raise BackendUnavailableError(
            f"{self.uri}: drain gave up after {timeout_s:g} s of forced retries ({failure}); "
            f"pending: {listed or 'unknown'}; their bookkeeping is kept for gc()/drain()"
        )

    def _close_backend(self) -> None:
        if self._owns_client:
            self.client.close()
