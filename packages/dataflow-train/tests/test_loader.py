import dataclasses
import threading
import time

import pytest
import torch
from train_support import CountingStore, ListQueue, ledger_queue, put_samples, sample_tensors

from dataflow.contracts import (
    BackendUnavailableError,
    ClosedError,
    InvalidInputError,
    NotFoundError,
    SchemaMismatchError,
    TrainBatch,
)
from dataflow.store import open_store
from dataflow.train.loader import FeatureDataLoader


def _retained(name: str):
    return open_store(f"memory://{name}", retain_on_release=True)


def _ids(batches):
    return [sid for batch in batches for sid in batch.sample_ids]


def test_refs_mode_yields_every_sample_once_per_epoch_with_a_seeded_shuffle():
    store = _retained("epochs")
    refs = put_samples(store, 8, lengths=[5, 7])
    loader = FeatureDataLoader(store, refs=refs, batch_size=2, seed=3, num_epochs=2)
    batches = list(loader)
    assert all(isinstance(b, TrainBatch) for b in batches)
    first, second = _ids(batches[:4]), _ids(batches[4:])
    assert sorted(first) == sorted(second) == [r.sample_id for r in refs]
    assert first != second  # reshuffled per epoch
    again = FeatureDataLoader(store, refs=refs, batch_size=2, seed=3, num_epochs=2)
    assert _ids(list(again)) == first + second  # same seed, same order
    assert store.health().active_leases == 0
    assert loader.state_dict()["epoch"] == 2


def test_batch_tensors_are_the_stored_features_padded():
    store = _retained("values")
    refs = put_samples(store, 2, lengths=[5, 7])
    (batch,) = FeatureDataLoader(store, refs=refs, batch_size=2, shuffle=False)
    assert batch.sample_ids == ("s000", "s001")
    expected = sample_tensors(1000, 5)
    assert torch.equal(batch.tensors["hidden_state"][0, :5], expected["hidden_state"][0])
    assert batch.tensors["attention_mask"].tolist()[0] == [1] * 5 + [0] * 2


def test_ranks_get_disjoint_batches_of_one_global_order():
    store = _retained("ranks")
    refs = put_samples(store, 9)
    whole = _ids(FeatureDataLoader(store, refs=refs, batch_size=2, seed=1))
    r0 = _ids(FeatureDataLoader(store, refs=refs, batch_size=2, seed=1, rank=0, world_size=2))
    r1 = _ids(FeatureDataLoader(store, refs=refs, batch_size=2, seed=1, rank=1, world_size=2))
    assert r0 == whole[0:2] + whole[4:6] and r1 == whole[2:4] + whole[6:8]


def test_seek_resumes_at_the_saved_position_without_fetching_skipped_samples():
    inner = _retained("seek")
    refs = put_samples(inner, 8)
    straight = _ids(FeatureDataLoader(inner, refs=refs, batch_size=2, seed=5, num_epochs=2))
    first = FeatureDataLoader(inner, refs=refs, batch_size=2, seed=5, num_epochs=2)
    it = iter(first)
    seen = _ids([next(it) for _ in range(5)])  # one batch into epoch 1
    first.close()
    state = first.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 1)

    spy = CountingStore(inner)
    resumed = FeatureDataLoader(spy, refs=refs, batch_size=2, seed=5, num_epochs=2)
    resumed.load_state_dict(state)
    rest = _ids(resumed)
    assert seen + rest == straight
    assert spy.fetched == rest  # nothing before the position was materialised


def test_load_state_dict_refuses_a_position_from_another_plan_and_changes_nothing():
    store = _retained("refuse")
    refs = put_samples(store, 8)
    loader = FeatureDataLoader(store, refs=refs, batch_size=2, seed=5)
    saved = {**loader.state_dict(), "batch": 1}
    other = FeatureDataLoader(store, refs=refs, batch_size=4, seed=6)
    with pytest.raises(
        InvalidInputError, match=r"batch_size: saved 2, now 4; seed: saved 5, now 6"
    ):
        other.load_state_dict(saved)
    assert other.state_dict()["batch"] == 0
    with pytest.raises(InvalidInputError, match="outside the plan"):
        loader.load_state_dict({**saved, "batch": 9})
    assert loader.state_dict()["batch"] == 0


def test_queue_mode_trains_the_controllers_windows_in_order():
    store = open_store("memory://queue-ledger")
    refs = put_samples(store, 5)
    loader = FeatureDataLoader(store, queue=ledger_queue(store, refs, 2, "ql"), batch_size=2)
    assert _ids(loader) == [r.sample_id for r in refs[:4]]  # the tail of 1 is never dispatched
    health = store.health()
    assert (health.resident_samples, health.active_leases) == (0, 0)  # consume-once + dropped


def test_queue_mode_settles_a_partial_tail_at_a_clean_end():
    # The controller never dispatches a partial window; a protocol-level queue that ends
    # mid-batch shows the loader's own guard.
    store = open_store("memory://queue")
    baseline = store.health()
    refs = put_samples(store, 5)
    loader = FeatureDataLoader(store, queue=ListQueue(refs), batch_size=2)
    assert _ids(loader) == [r.sample_id for r in refs[:4]]
    health = store.health()
    # consume-once: trained samples were freed on release; the partial tail was aborted
    assert (health.resident_samples, health.active_leases) == (0, 0)
    assert health.resident_bytes == baseline.resident_bytes


def test_prefetch_close_returns_never_yielded_refs_and_holds_no_lease():
    store = open_store("memory://prefetch")
    refs = put_samples(store, 8)
    queue = ListQueue(refs)
    loader = FeatureDataLoader(store, queue=queue, batch_size=1, prefetch=2)
    it = iter(loader)
    first = next(it)
    deadline = time.monotonic() + 10
    while queue.pulled < 4 and time.monotonic() < deadline:  # 2 buffered + 1 waiting to enter
        time.sleep(0.01)
    returned = loader.close()
    assert first.sample_ids == ("s000",)
    assert [r.sample_id for r in returned] == ["s001", "s002", "s003"]
    assert store.health().active_leases == 0
    assert loader.close() == []  # idempotent
    with pytest.raises(ClosedError):
        iter(loader)


def test_prefetch_yields_the_same_batches_as_the_synchronous_path():
    store = _retained("same")
    refs = put_samples(store, 6, lengths=[4, 9])
    sync = list(FeatureDataLoader(store, refs=refs, batch_size=2, seed=2))
    ahead = list(FeatureDataLoader(store, refs=refs, batch_size=2, seed=2, prefetch=2))
    assert [b.sample_ids for b in sync] == [b.sample_ids for b in ahead]
    for a, b in zip(sync, ahead, strict=True):
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def _refused_case(case: str, store):
    good = put_samples(store, 1, prefix="good")[0]
    if case == "strategy":
        return [good, put_samples(store, 1, prefix="also")[0]], "peagle", "strategy 'eagle3'"
    if case == "schema version":
        bad = dataclasses.replace(put_samples(store, 1, prefix="bad")[0], schema_version=2)
        return [good, bad], "eagle3", "schema version 2"
    tensors = sample_tensors(7, 8)
    if case == "feature names":
        del tensors["aux_hidden_state"]
        message = "carry different features"
    elif case == "dtypes":
        tensors["hidden_state"] = tensors["hidden_state"].to(torch.bfloat16)
        message = "is float32 in 'good000' but bfloat16"
    else:  # ranks
        tensors["hidden_state"] = tensors["hidden_state"][..., 0]
        message = "rank 3 in 'good000' but rank 2"
    return [good, store.put("bad000", tensors)], "eagle3", message


CASES = ["strategy", "schema version", "feature names", "dtypes", "ranks"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("prefetch", [0, 2])
def test_queue_mode_refuses_a_mixed_batch_and_frees_its_features(case, prefetch):
    name = f"refuse-{case.replace(' ', '-')}-{prefetch}"
    store = open_store(f"memory://{name}")
    baseline = store.health()
    refs, strategy, message = _refused_case(case, store)
    queue = ledger_queue(store, refs, 2, name)
    loader = FeatureDataLoader(
        store, queue=queue, batch_size=2, strategy=strategy, prefetch=prefetch
    )
    with pytest.raises(SchemaMismatchError, match=message):
        list(loader)
    assert loader.close() == []  # settled, not handed back
    assert store.health() == dataclasses.replace(baseline, oldest_age_s=0.0)


@pytest.mark.parametrize("case", CASES)
def test_refs_mode_refuses_a_mixed_batch_without_touching_the_dataset(case):
    store = _retained(f"refuse-refs-{case.replace(' ', '-')}")
    refs, strategy, message = _refused_case(case, store)
    before = store.health()
    loader = FeatureDataLoader(store, refs=refs, batch_size=2, strategy=strategy, shuffle=False)
    with pytest.raises(SchemaMismatchError, match=message):
        list(loader)
    after = store.health()
    assert after.active_leases == 0
    assert after.resident_samples == before.resident_samples  # offline data is not the loader's


def test_a_failed_get_mid_batch_releases_the_leases_already_taken():
    store = _retained("midfail")
    refs = put_samples(store, 2)
    store.abort(refs[1].sample_id, "test")
    loader = FeatureDataLoader(store, refs=refs, batch_size=2, shuffle=False)
    with pytest.raises(NotFoundError):
        list(loader)
    assert store.health().active_leases == 0
    assert [r.sample_id for r in loader.close()] == ["s000", "s001"]


def test_constructor_refuses_bad_arguments():
    store = _retained("args")
    with pytest.raises(InvalidInputError, match="exactly one of refs= or queue="):
        FeatureDataLoader(store)
    with pytest.raises(InvalidInputError, match="batch_size must be an int >= 1"):
        FeatureDataLoader(store, refs=[], batch_size=0)
    with pytest.raises(InvalidInputError, match="duplicate sample ids"):
        ref = put_samples(store, 1)[0]
        FeatureDataLoader(store, refs=[ref, ref])
    tensors = {"input_ids": torch.zeros(1, 4, dtype=torch.int64)}  # features, not a ref
    with pytest.raises(InvalidInputError, match=r"refs\[1\] is a dict, not a SampleRef"):
        FeatureDataLoader(store, refs=[ref, tensors])  # type: ignore[list-item]


class _HangingGets:
    """Fault injection a real store cannot produce on demand: ``get`` of one sample blocks."""

    def __init__(self, inner, hang_on: str):
        self.inner, self.hang_on = inner, hang_on
        self.unblock = threading.Event()

    def get(self, ref, names=None):
        if ref.sample_id == self.hang_on:
            self.unblock.wait(30)
        return self.inner.get(ref, names)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_close_is_bounded_even_when_a_store_get_hangs():
    inner = open_store("memory://hang")
    refs = put_samples(inner, 3)
    store = _HangingGets(inner, hang_on="s001")
    loader = FeatureDataLoader(
        store, queue=ListQueue(refs), batch_size=1, prefetch=1, join_timeout_s=0.3
    )
    it = iter(loader)
    assert next(it).sample_ids == ("s000",)
    began = time.monotonic()
    with pytest.raises(BackendUnavailableError, match=r"did not stop within 0.3s.*'s001'"):
        loader.close()
    assert time.monotonic() - began < 5
    assert [r.sample_id for r in loader.close()] == ["s001"]  # handed back on the next close
    store.unblock.set()  # let the worker finish: it must still release what it fetched
    deadline = time.monotonic() + 5
    while inner.health().active_leases and time.monotonic() < deadline:
        time.sleep(0.01)
    assert inner.health().active_leases == 0


def test_early_exit_without_prefetch_holds_nothing_and_returns_nothing_unfetched():
    store = _retained("early")
    refs = put_samples(store, 6)
    loader = FeatureDataLoader(store, refs=refs, batch_size=2, shuffle=False)
    for batch in loader:
        assert batch.sample_ids == ("s000", "s001")
        break
    assert store.health().active_leases == 0
    assert loader.close() == []  # nothing was fetched beyond the yielded batch
    assert loader.state_dict()["batch"] == 1


class _OneRefThenSilence:
    """A rank queue that hands out one ref, then has nothing more (a window still filling)."""

    def __init__(self, ref) -> None:
        self._ref = ref

    def get(self, timeout: float | None = None):
        ref, self._ref = self._ref, None
        if ref is not None:
            return ref
        time.sleep(timeout or 0)
        raise TimeoutError

    def close(self) -> None:
        pass


def test_a_stop_hands_a_partial_batch_back_instead_of_settling_it():
    # A consumer stopped (SIGTERM) while its prefetch thread holds half a window: the window is
    # still assigned in the ledger and a resume trains it, so its features must stay. Only a
    # clean end of stream settles a partial batch (the test above).
    from dataflow.train.ref_sources import QueueRefSource

    store = open_store("memory://stopped")
    (ref,) = put_samples(store, 1)
    stop = threading.Event()
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    pulled, settled = [], []
    source = QueueRefSource(_OneRefThenSilence(ref), batch_size=2, idle_timeout_s=None, poll_s=0.05)
    batches = list(source.batches(stop, pulled.extend, settled.extend))
    timer.join()
    assert batches == [] and pulled == [ref] and settled == []
    assert store.health().resident_samples == 1  # nothing aborted: the resume still reads it
