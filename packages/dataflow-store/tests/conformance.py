"""The FeatureStore conformance suite: every backend's test module subclasses StoreConformance.

How a backend plugs in (see test_memory.py for the smallest example)::

    from conformance import StoreConformance

    class TestMyBackendConformance(StoreConformance):
        def open(self, tmp_path, **options):
            return open_store("my://...", **options)

``open`` receives pytest's ``tmp_path`` and the options a test needs; it must pass them on to the
store unchanged. The options used are the common ones every ``BookkeepingStore`` accepts:
``budget_bytes``, ``max_age_s``, ``retain_on_release``, ``clock`` (a zero-argument callable
returning monotonic seconds; tests pass a :class:`FakeClock`) and ``faults`` (a
``dataflow.store.FaultInjector``). Stores are made through the ``make_store`` fixture, which
closes them afterwards; each test aborts what it stored and most assert health is back to the
baseline of a fresh store, so a leaking backend fails.

A read-only backend sets ``read_only = True`` and overrides :meth:`StoreConformance.put` to
publish a sample its own way (for ``file://``: write a safetensors file) and return its ref;
cases that need a store-side put (generations, budget, gc) are then skipped with that reason,
and the backend's own module tests that its puts are refused.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from dataflow.contracts import (
    BackendUnavailableError,
    CapacityExceededError,
    ClosedError,
    FeatureSpec,
    FeatureStore,
    InvalidInputError,
    NotFoundError,
    SampleRef,
    SchemaMismatchError,
    StaleGenerationError,
    StoreHealth,
)
from dataflow.store import FaultInjector

DTYPES = (
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
)
SHAPES = ((), (7,), (3, 5), (2, 3, 4), (0, 4))


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random values covering the dtype's whole bit range (NaNs and infinities included)."""
    gen = torch.Generator().manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape, itemsize), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        return (raw[..., 0] % 2).to(torch.bool)
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors have the same dtype, shape and bytes (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(
        torch.equal(
            a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
        )
    )


def eagle_sample(seed: int = 0, tokens: int = 16, hidden: int = 8) -> dict[str, torch.Tensor]:
    """A small sample shaped like EAGLE3 features."""
    return {
        "input_ids": random_tensor(torch.int64, (tokens,), seed),
        "loss_mask": random_tensor(torch.int64, (tokens,), seed + 1),
        "hidden_state": random_tensor(torch.bfloat16, (1, tokens, hidden), seed + 2),
        "aux_hidden_state": random_tensor(torch.bfloat16, (1, tokens, 3 * hidden), seed + 3),
    }


def sample_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def empty_health(store: FeatureStore) -> StoreHealth:
    """The health a store with these options reports when it holds nothing."""
    health = store.health()
    return StoreHealth(backend=health.backend, budget_bytes=health.budget_bytes)


def baseline(health: StoreHealth) -> StoreHealth:
    """Health with the age zeroed, for exact comparison against a fresh store."""
    return dataclasses.replace(health, oldest_age_s=0.0)


class StoreConformance:
    """The store conformance cases (docs/architecture.md §6); subclass it and implement :meth:`open`."""

    read_only: ClassVar[bool] = False

    # ------------------------------------------------------------------ plug-in points

    def open(self, tmp_path: Path, **options: Any) -> FeatureStore:
        """Open a fresh, empty store of the backend under test with ``options``."""
        raise NotImplementedError

    def put(
        self, store: FeatureStore, sample_id: str, tensors: dict[str, torch.Tensor]
    ) -> SampleRef:
        """Publish a sample and return its ref (a read-only backend overrides this)."""
        return store.put(sample_id, tensors)

    # ------------------------------------------------------------------ fixtures

    @pytest.fixture
    def make_store(self, tmp_path: Path) -> Iterator[Callable[..., FeatureStore]]:
        made: list[FeatureStore] = []

        def make(**options: Any) -> FeatureStore:
            store = self.open(tmp_path, **options)
            made.append(store)
            return store

        yield make
        for store in made:
            store.close()

    @pytest.fixture
    def store(self, make_store: Callable[..., FeatureStore]) -> FeatureStore:
        return make_store()

    def writes_needed(self) -> None:
        if self.read_only:
            pytest.skip("read-only backend: store-side puts are refused (tested in its module)")

    def drain(self, store: FeatureStore, ids: list[str]) -> None:
        for sid in ids:
            store.abort(sid, "test teardown")

    def test_implements_the_feature_store_protocol(self, store: FeatureStore) -> None:
        assert isinstance(store, FeatureStore)
        assert store.uri.split("://")[0] == store.health().backend

    # ------------------------------------------------------------------ round trip

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_round_trip_is_bit_exact_for_every_dtype_and_shape(
        self, store: FeatureStore, dtype: torch.dtype
    ) -> None:
        tensors = {
            f"f{len(shape)}d{i}": random_tensor(dtype, shape, i) for i, shape in enumerate(SHAPES)
        }
        ref = self.put(store, "rt", tensors)
        assert dict(ref.feature_specs) == {
            n: FeatureSpec(n, tuple(t.shape), str(dtype).removeprefix("torch."))
            for n, t in tensors.items()
        }
        got, handle = store.get(ref)
        assert set(got) == set(tensors)
        for name, tensor in tensors.items():
            assert same_bits(got[name], tensor), name
        store.release(handle)
        self.drain(store, ["rt"])

    def test_get_subset_of_names(self, store: FeatureStore) -> None:
        tensors = eagle_sample(1)
        ref = self.put(store, "subset", tensors)
        got, handle = store.get(ref, names=["loss_mask", "hidden_state"])
        assert sorted(got) == ["hidden_state", "loss_mask"]
        assert same_bits(got["hidden_state"], tensors["hidden_state"])
        assert same_bits(got["loss_mask"], tensors["loss_mask"])
        store.release(handle)
        self.drain(store, ["subset"])

    def test_unknown_name_is_refused_and_takes_no_lease(self, store: FeatureStore) -> None:
        ref = self.put(store, "names", eagle_sample(2))
        before = store.health()
        with pytest.raises(NotFoundError, match=r"no feature\(s\) \['nope'\]"):
            store.get(ref, names=["nope"])
        assert baseline(store.health()) == baseline(before)
        self.drain(store, ["names"])

    def test_ref_whose_spec_disagrees_with_stored_bytes_is_refused(
        self, store: FeatureStore
    ) -> None:
        tensors = eagle_sample(3)
        ref = self.put(store, "spec", tensors)
        specs = dict(ref.feature_specs)
        specs["hidden_state"] = FeatureSpec("hidden_state", (1, 8, 16), "bfloat16")  # same bytes
        lying = dataclasses.replace(ref, feature_specs=specs)
        retyped = dict(ref.feature_specs)
        retyped["input_ids"] = FeatureSpec("input_ids", (16,), "float64")
        lying_dtype = dataclasses.replace(ref, feature_specs=retyped)
        before = store.health()
        with pytest.raises(
            SchemaMismatchError, match=r"hidden_state.*bfloat16\[1, 16, 8\].*bfloat16\[1, 8, 16\]"
        ):
            store.get(lying)
        with pytest.raises(SchemaMismatchError, match=r"input_ids.*int64\[16\].*float64\[16\]"):
            store.get(lying_dtype, names=["input_ids"])
        assert baseline(store.health()) == baseline(before)
        got, handle = store.get(ref)  # the honest ref still works
        assert same_bits(got["hidden_state"], tensors["hidden_state"])
        store.release(handle)
        self.drain(store, ["spec"])

    def test_ref_of_another_store_is_refused(self, store: FeatureStore) -> None:
        ref = self.put(store, "other", eagle_sample(4))
        foreign = dataclasses.replace(ref, store_uri="memory://somewhere-else")
        with pytest.raises(InvalidInputError, match="belongs to store 'memory://somewhere-else'"):
            store.get(foreign)
        assert store.health().active_leases == 0
        self.drain(store, ["other"])

    # ------------------------------------------------------------------ generations

    def test_every_put_makes_a_new_generation_and_old_refs_are_stale(
        self, store: FeatureStore
    ) -> None:
        self.writes_needed()
        first = store.put("gen", eagle_sample(5))
        second = store.put("gen", eagle_sample(6))
        assert second.generation > first.generation
        assert second.feature_keys != first.feature_keys
        with pytest.raises(StaleGenerationError, match=rf"generation {first.generation} is stale"):
            store.get(first)
        got, handle = store.get(second)
        assert same_bits(got["input_ids"], eagle_sample(6)["input_ids"])
        store.release(handle)
        assert store.health().resident_samples == 0

    def test_releasing_a_stale_handle_never_frees_newer_data(self, store: FeatureStore) -> None:
        self.writes_needed()
        old_ref = store.put("stale", eagle_sample(7))
        _, old_handle = store.get(old_ref)
        new_ref = store.put("stale", eagle_sample(8))
        store.release(old_handle)
        store.release(old_handle)
        got, handle = store.get(new_ref)
        assert same_bits(got["hidden_state"], eagle_sample(8)["hidden_state"])
        store.release(handle)
        with pytest.raises(NotFoundError, match="released or aborted"):
            store.get(new_ref)
        assert baseline(store.health()) == empty_health(store)

    def test_reput_while_leased_then_release_both_leaks_nothing(self, store: FeatureStore) -> None:
        self.writes_needed()
        base = baseline(store.health())
        old_ref = store.put("reput", eagle_sample(9))
        _, old_handle = store.get(old_ref)
        new_ref = store.put("reput", eagle_sample(10))
        _, new_handle = store.get(new_ref)
        store.release(new_handle)
        store.release(old_handle)
        assert baseline(store.health()) == base

    # ------------------------------------------------------------------ leases

    def test_consume_once_last_lease_frees(self, store: FeatureStore) -> None:
        self.writes_needed()
        ref = store.put("once", eagle_sample(11))
        _, first = store.get(ref)
        _, second = store.get(ref)
        assert first.token != second.token
        assert store.health().active_leases == 2
        store.release(first)
        got, third = store.get(ref)  # still resident: one lease remains
        assert same_bits(got["loss_mask"], eagle_sample(11)["loss_mask"])
        store.release(second)
        store.release(third)
        with pytest.raises(NotFoundError, match=r"'once' generation \d+ was released or aborted"):
            store.get(ref)
        health = store.health()
        assert (health.resident_samples, health.resident_bytes, health.active_leases) == (0, 0, 0)

    def test_retain_on_release_keeps_data_until_abort(
        self, make_store: Callable[..., FeatureStore]
    ) -> None:
        store = make_store(retain_on_release=True)
        tensors = eagle_sample(12)
        ref = self.put(store, "keep", tensors)
        for _ in range(3):  # three epochs
            got, handle = store.get(ref)
            assert same_bits(got["aux_hidden_state"], tensors["aux_hidden_state"])
            store.release(handle)
        health = store.health()
        assert health.resident_samples == 1 and health.active_leases == 0
        store.abort("keep", "end of run")
        with pytest.raises(NotFoundError, match="released or aborted"):
            store.get(ref)

    def test_release_and_abort_are_idempotent(self, store: FeatureStore) -> None:
        ref = self.put(store, "idem", eagle_sample(13))
        _, handle = store.get(ref)
        store.release(handle)
        store.release(handle)
        store.abort("idem", "first")
        store.abort("idem", "second")
        store.abort("never-put", "unknown ids are fine")
        store.release(handle)
        health = store.health()
        assert (health.resident_samples, health.active_leases, health.pending_frees) == (0, 0, 0)

    def test_get_after_release_or_abort_fails_clearly(self, store: FeatureStore) -> None:
        released = self.put(store, "gone-r", eagle_sample(14))
        aborted = self.put(store, "gone-a", eagle_sample(15))
        _, handle = store.get(released)
        store.release(handle)
        store.abort("gone-r", "retain backends free on abort")
        _, leased = store.get(aborted)
        store.abort("gone-a", "dropped: stale")  # frees despite the lease
        for ref in (released, aborted):
            with pytest.raises(
                NotFoundError,
                match=rf"{ref.sample_id!r} generation {ref.generation} was released or aborted",
            ):
                store.get(ref)
        store.release(leased)  # releasing a lease of an aborted sample is harmless
        assert store.health().active_leases == 0

    def test_abort_frees_despite_leases(self, store: FeatureStore) -> None:
        ref = self.put(store, "ab", eagle_sample(16))
        _, h1 = store.get(ref)
        _, h2 = store.get(ref)
        store.abort("ab", "drop")
        health = store.health()
        assert (health.resident_samples, health.active_leases) == (0, 0)
        store.release(h1)
        store.release(h2)

    # ------------------------------------------------------------------ budget

    def test_over_budget_put_fails_and_changes_nothing(
        self, make_store: Callable[..., FeatureStore]
    ) -> None:
        self.writes_needed()
        one = sample_bytes(eagle_sample(0))
        store = make_store(budget_bytes=2 * one + one // 2)
        a = store.put("b1", eagle_sample(17))
        store.put("b2", eagle_sample(18))
        before = store.health()
        assert before.resident_bytes == 2 * one
        with pytest.raises(
            CapacityExceededError,
            match=rf"put of 'b3' needs {one} bytes but {2 * one} of the {2 * one + one // 2}-byte budget",
        ):
            store.put("b3", eagle_sample(19))
        assert baseline(store.health()) == baseline(before)
        with pytest.raises(NotFoundError):
            store.get(dataclasses.replace(a, sample_id="b3"))
        _, handle = store.get(a)
        store.release(handle)  # frees b1: room for b3 now
        store.put("b3", eagle_sample(19))
        assert store.health().resident_bytes == 2 * one
        self.drain(store, ["b2", "b3"])

    # ------------------------------------------------------------------ gc

    def test_gc_frees_old_unleased_samples_and_spares_leased_ones(
        self, make_store: Callable[..., FeatureStore]
    ) -> None:
        self.writes_needed()
        clock = FakeClock()
        store = make_store(max_age_s=10.0, clock=clock)
        old = store.put("old", eagle_sample(20))
        leased = store.put("leased", eagle_sample(21))
        _, handle = store.get(leased)
        clock.advance(5)
        store.put("young", eagle_sample(22))
        assert store.gc().freed_samples == 0
        clock.advance(6)  # old and leased are 11 s old, young 6 s
        report = store.gc()
        assert (report.freed_samples, report.freed_bytes) == (1, sample_bytes(eagle_sample(0)))
        with pytest.raises(NotFoundError, match="released or aborted"):
            store.get(old)
        got, h2 = store.get(leased)
        assert same_bits(got["input_ids"], eagle_sample(21)["input_ids"])
        store.release(h2)
        store.release(handle)  # consume-once: frees it
        assert store.health().resident_samples == 1
        assert store.gc().freed_samples == 0  # young is only 6 s old
        self.drain(store, ["young"])

    def test_gc_retries_failed_frees(self, make_store: Callable[..., FeatureStore]) -> None:
        self.writes_needed()
        faults = FaultInjector()
        store = make_store(faults=faults)
        base = baseline(store.health())
        ref = store.put("flaky", eagle_sample(23))
        _, handle = store.get(ref)
        faults.fail_next_deletes(2)
        store.release(handle)  # the free fails: parked, still counted resident
        health = store.health()
        assert (health.pending_frees, health.resident_bytes) == (1, sample_bytes(eagle_sample(0)))
        with pytest.raises(NotFoundError, match="released or aborted"):
            store.get(ref)  # tombstoned at once
        report = store.gc()  # second injected failure
        assert (report.retried_frees, report.failed_frees, report.freed_samples) == (1, 1, 0)
        assert store.health().pending_frees == 1
        report = store.gc()  # the real free runs now
        assert (report.retried_frees, report.failed_frees, report.freed_samples) == (1, 0, 1)
        assert faults.fired == 2
        assert baseline(store.health()) == base

    def test_drain_retries_until_frees_succeed_or_fails_loudly(
        self, make_store: Callable[..., FeatureStore]
    ) -> None:
        self.writes_needed()
        faults = FaultInjector()
        store = make_store(faults=faults)
        base = baseline(store.health())
        ref = store.put("drained", eagle_sample(24))
        faults.fail_next_deletes(3)  # the release and two retries fail, the third retry frees
        store.release(store.get(ref)[1])
        assert store.drain(timeout_s=30, interval_s=0) == 1  # type: ignore[attr-defined]
        assert baseline(store.health()) == base
        stuck = store.put("stuck", eagle_sample(25))
        faults.fail_next_deletes(10**9)
        store.abort("stuck", "dropped")
        with pytest.raises(BackendUnavailableError, match=r"1 free\(s\) still failing"):
            store.drain(timeout_s=0.05, interval_s=0.01)  # type: ignore[attr-defined]
        assert store.health().pending_frees == 1  # bookkeeping kept for the next attempt
        with pytest.raises(NotFoundError, match="released or aborted"):
            store.get(stuck)
        faults.clear()
        assert store.drain(timeout_s=30, interval_s=0) == 1  # type: ignore[attr-defined]
        assert baseline(store.health()) == base

    # ------------------------------------------------------------------ threads

    def test_threads_put_get_release_concurrently(self, store: FeatureStore) -> None:
        errors: list[BaseException] = []
        base = baseline(store.health())

        def worker(w: int) -> None:
            try:
                for i in range(12):
                    sid = f"t{w}-{i % 3}"
                    tensors = eagle_sample(100 * w + i)
                    ref = self.put(store, sid, tensors)
                    got, handle = store.get(ref)
                    assert same_bits(got["hidden_state"], tensors["hidden_state"])
                    store.release(handle)
                    if self.read_only or i % 4 == 3:
                        store.abort(sid, "thread test")
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        self.drain(store, [f"t{w}-{i}" for w in range(4) for i in range(3)])
        assert baseline(store.health()) == base

    # ------------------------------------------------------------------ health and misuse

    def test_health_returns_to_baseline_after_everything_is_aborted(
        self, store: FeatureStore
    ) -> None:
        base = baseline(store.health())
        assert (
            base.resident_samples,
            base.resident_bytes,
            base.active_leases,
            base.pending_frees,
        ) == (0, 0, 0, 0)
        refs = [self.put(store, f"h{i}", eagle_sample(30 + i)) for i in range(5)]
        handles = [store.get(ref)[1] for ref in refs[:3]]
        busy = store.health()
        assert busy.resident_samples == 5 and busy.active_leases == 3
        assert busy.resident_bytes == 5 * sample_bytes(eagle_sample(0))
        for ref in refs:
            store.abort(ref.sample_id, "drain")
        assert baseline(store.health()) == base
        for handle in handles:
            store.release(handle)
        assert baseline(store.health()) == base

    def test_bad_puts_are_refused_and_change_nothing(self, store: FeatureStore) -> None:
        self.writes_needed()
        before = store.health()
        cases: list[tuple[str, Any, str]] = [
            (
                "../escape",
                eagle_sample(0),
                "sample id '../escape' contains the forbidden character '/'",
            ),
            ("ok", {}, "tensors must not be empty"),
            ("ok", {"x": [1, 2]}, "feature 'x' must be a torch.Tensor, got list"),
            (
                "ok",
                {"x": torch.zeros(2, dtype=torch.complex64)},
                "feature 'x' has dtype torch.complex64",
            ),
            (
                "ok",
                {"bad/name": torch.zeros(2)},
                "feature name 'bad/name' contains the forbidden character",
            ),
            ("ok", "not a mapping", "tensors must be a mapping"),
        ]
        for sid, tensors, message in cases:
            with pytest.raises(
                InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")
            ):
                store.put(sid, tensors)
        with pytest.raises(InvalidInputError, match="metadata"):
            store.put("ok", eagle_sample(0), {"when": object()})
        assert baseline(store.health()) == baseline(before)

    def test_closed_store_refuses_operations(self, make_store: Callable[..., FeatureStore]) -> None:
        store = make_store()
        ref = self.put(store, "closed", eagle_sample(40))
        store.abort("closed", "before close")
        store.close()
        store.close()
        with pytest.raises(ClosedError, match="closed"):
            store.get(ref)
        with pytest.raises(ClosedError, match="closed"):
            store.health()
