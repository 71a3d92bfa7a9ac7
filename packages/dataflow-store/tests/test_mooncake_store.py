"""mooncake:// against a real mooncake_master: the conformance suite and Mooncake's own cases.

Conformance stores borrow one client (connecting costs a handshake probe, closing ~1 s); the
tests of connecting, closing and cross-process use stores that own their client.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conformance import FakeClock, StoreConformance, baseline, eagle_sample, same_bits
from dataflow_testing.mooncake import MasterFactory, MooncakeMaster
from dataflow_testing.ports import free_port
from procs import PRELUDE, run_child

from dataflow.contracts import (
    BackendUnavailableError,
    CapacityExceededError,
    ClosedError,
    CorruptRecordError,
    FeatureSpec,
    FeatureStore,
    InvalidInputError,
    NotFoundError,
    SampleRef,
    SchemaMismatchError,
)
from dataflow.contracts.codec import loads
from dataflow.store import FaultInjector, open_store
from dataflow.store import mooncake_wire as wire
from dataflow.store.mooncake import MooncakeFeatureStore
from dataflow.store.mooncake_client import MooncakeClient, ObjectIO, Region
from dataflow.store.mooncake_settings import settings_from_uri

pytestmark = pytest.mark.mooncake


def connect(master: MooncakeMaster, segment: str = "256MiB") -> MooncakeClient:
    return MooncakeClient.connect(
        settings_from_uri(master.uri, {"segment": segment, "buffer": "16MiB"})
    )


@pytest.fixture(scope="module")
def client(mooncake_master: MooncakeMaster) -> Iterator[MooncakeClient]:
    """The client conformance stores borrow; it mounts the segment their objects live in."""
    shared = connect(mooncake_master)
    yield shared
    shared.close()


@pytest.fixture(scope="module")
def reader(mooncake_master: MooncakeMaster) -> Iterator[MooncakeClient]:
    """A second Mooncake client: another reader, as a consumer process would be."""
    other = connect(mooncake_master, segment="0")
    yield other
    other.close()


def mooncake_store(master: MooncakeMaster, client: MooncakeClient, **options: Any) -> Any:
    return open_store(master.uri, client=client, **options)


def keys_of(store: Any, ref: Any) -> list[str]:
    return [wire.manifest_key(ref.sample_id, ref.generation)] + [
        wire.feature_key(ref.sample_id, ref.generation, n) for n in ref.feature_specs
    ]


def read_like_another_process(reader: MooncakeClient, ref: Any, name: str) -> torch.Tensor:
    """Read one feature object with a different client: Mooncake gives it a read lease."""
    spec = ref.feature_specs[name]
    header = torch.empty(
        len(wire.feature_header(ref.sample_id, ref.generation, spec)), dtype=torch.uint8
    )
    out = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype))
    key = wire.feature_key(ref.sample_id, ref.generation, name)
    reader.get(
        [
            ObjectIO(
                key,
                (Region(header.data_ptr(), header.numel()), Region(out.data_ptr(), spec.nbytes)),
            )
        ]
    )
    return out


class TestMooncakeConformance(StoreConformance):
    @pytest.fixture(autouse=True)
    def _cluster(self, mooncake_master: MooncakeMaster, client: MooncakeClient) -> None:
        self.master = mooncake_master
        self.client = client

    def open(self, tmp_path: Path, **options: Any) -> FeatureStore:
        return mooncake_store(self.master, self.client, **options)


# ---------------------------------------------------------------------- connecting


def test_missing_master_is_a_clear_error_within_seconds() -> None:
    port = free_port()  # nothing listens here
    start = time.monotonic()
    with pytest.raises(
        BackendUnavailableError, match=rf"no Mooncake master reachable at 127.0.0.1:{port}"
    ):
        open_store(f"mooncake://127.0.0.1:{port}", connect_timeout_s=2)
    assert time.monotonic() - start < 3


def test_a_port_that_is_not_a_master_fails_within_the_timeout() -> None:
    with socket.socket() as impostor:  # accepts TCP, never speaks Mooncake's RPC
        impostor.bind(("127.0.0.1", 0))
        impostor.listen(8)
        port = impostor.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(
            BackendUnavailableError, match="did not complete a Mooncake handshake within 1.5 s"
        ):
            open_store(f"mooncake://127.0.0.1:{port}", connect_timeout_s=1.5)
        assert time.monotonic() - start < 4


def test_bad_options_are_refused_before_connecting(
    mooncake_master: MooncakeMaster, client: MooncakeClient
) -> None:
    uri = mooncake_master.uri
    cases: list[tuple[str, dict[str, Any], str]] = [
        (uri, {"segmnet": "1GiB"}, r"unknown mooncake option\(s\) \['segmnet'\]"),
        (uri, {"segment": "lots"}, "'segment' must be a size like 4096, 64MiB or 1GiB"),
        (uri, {"protocol": "udp"}, "'protocol' must be one of"),
        (uri, {"connect_timeout_s": 0}, "'connect_timeout_s' must be a number > 0"),
        (uri, {"lease_grace_s": -1}, "lease_grace_s must be a number >= 0"),
        (uri, {"client": "not a client"}, "client must be a MooncakeClient, got str"),
        (uri + "?hard_pin=maybe", {}, "'hard_pin' must be true or false"),
        ("mooncake://10.1.2.3:50051", {}, "is not on loopback: pass local_hostname="),
        ("mooncake://127.0.0.1:1", {"client": client}, "client is connected to 127.0.0.1:"),
    ]
    for target, options, message in cases:
        start = time.monotonic()
        with pytest.raises(InvalidInputError, match=message):
            open_store(target, **options)
        assert time.monotonic() - start < 1  # refused up front: nothing was contacted


def test_a_store_that_owns_its_client_round_trips_and_closes(
    mooncake_master: MooncakeMaster,
) -> None:
    store = open_store(mooncake_master.uri + "?segment=64MiB&buffer=8MiB")
    tensors = eagle_sample(50)
    ref = store.put("own", tensors)
    assert ref.store_uri == mooncake_master.uri
    got, handle = store.get(ref)
    assert all(same_bits(got[n], t) for n, t in tensors.items())
    store.release(handle)
    store.close()
    assert store.client.closed
    with pytest.raises(ClosedError, match="closed"):
        store.put("own", tensors)
    store.close()  # idempotent


def test_the_masters_http_metadata_server_works_as_the_metadata_option(
    start_mooncake_master: MasterFactory,
) -> None:
    master = start_mooncake_master(http_metadata=True)
    uri = f"{master.uri}?metadata={master.metadata_server}&segment=32MiB&buffer=8MiB"
    with open_store(uri) as store:
        tensors = eagle_sample(82)
        ref = store.put("meta", tensors)
        got, handle = store.get(ref, names=["aux_hidden_state"])
        assert same_bits(got["aux_hidden_state"], tensors["aux_hidden_state"])
        store.release(handle)
        assert store.health().resident_samples == 0


# ---------------------------------------------------------------------- layout in Mooncake


def test_every_key_carries_the_generation_and_objects_are_plain_safetensors(
    mooncake_master: MooncakeMaster, client: MooncakeClient, reader: MooncakeClient
) -> None:
    from safetensors.torch import load

    store = mooncake_store(mooncake_master, client)
    tensors = eagle_sample(51)
    ref = store.put("layout", tensors)
    keys = keys_of(store, ref)
    assert all(f"/g{ref.generation}" in k for k in keys)
    assert keys[0] == f"dataflow/layout/g{ref.generation}"
    assert reader.exists(keys) == [True] * len(keys)
    blob = reader.object_bytes(wire.feature_key("layout", ref.generation, "hidden_state"))
    assert same_bits(load(blob)["hidden_state"], tensors["hidden_state"])
    store.abort("layout", "done")
    assert reader.exists(keys) == [False] * len(keys)


def test_a_get_reads_into_fresh_private_tensors(
    mooncake_master: MooncakeMaster, client: MooncakeClient
) -> None:
    store = mooncake_store(mooncake_master, client, retain_on_release=True)
    tensors = eagle_sample(52)
    ref = store.put("private", tensors)
    first, h1 = store.get(ref)
    second, h2 = store.get(ref)
    assert first["hidden_state"].data_ptr() != second["hidden_state"].data_ptr()
    assert first["hidden_state"].data_ptr() != tensors["hidden_state"].data_ptr()
    first["hidden_state"].zero_()  # the caller owns what it got
    again, h3 = store.get(ref)
    assert same_bits(again["hidden_state"], tensors["hidden_state"])
    for handle in (h1, h2, h3):
        store.release(handle)
    store.abort("private", "done")


def fill_then_keep_putting(store: Any, seconds: float) -> tuple[list[Any], bool]:
    """Fill a 16 MiB cluster with ~4 MiB samples, then retry one more put for ``seconds``
    (each refused put makes Mooncake look for room). Returns the refs that fit and whether the
    late put eventually succeeded.
    """
    refs = []
    with pytest.raises(CapacityExceededError, match="NO_AVAILABLE_HANDLE"):
        for i in range(8):
            refs.append(store.put(f"pin{i}", eagle_sample(60 + i, tokens=128, hidden=4096)))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            store.put("late", eagle_sample(99, tokens=128, hidden=4096))
        except CapacityExceededError:
            time.sleep(0.1)
        else:
            return refs, True
    return refs, False


def readable(store: Any, refs: list[Any]) -> list[bool]:
    out = []
    for ref in refs:
        try:
            _, handle = store.get(ref, names=["input_ids"])
        except NotFoundError:
            out.append(False)
        else:
            store.release(handle)
            out.append(True)
    return out


def test_objects_are_hard_pinned_a_full_cluster_refuses_instead_of_evicting(
    start_mooncake_master: MasterFactory,
) -> None:
    # Without the pin Mooncake makes room by evicting a committed sample (silently) ...
    loose_master = start_mooncake_master()
    loose = open_store(loose_master.uri, segment="16MiB", buffer="8MiB", hard_pin=False)
    try:
        loose_refs, late_fit = fill_then_keep_putting(loose, seconds=8)
        assert late_fit and not all(readable(loose, loose_refs))
    finally:
        loose.close()
    # ... with it (the default) every put that does not fit is refused and nothing is lost.
    master = start_mooncake_master()
    store = open_store(master.uri, segment="16MiB", buffer="8MiB")
    try:
        refs, late_fit = fill_then_keep_putting(store, seconds=2)
        assert len(refs) >= 3 and not late_fit
        assert store.health().resident_samples == len(refs)  # refused puts left nothing:
        for refused in (f"pin{len(refs)}", "late"):  # not even the parts that did fit
            assert store.client.remove_matching(wire.sample_pattern(refused), force=True) == 0
        assert readable(store, refs) == [True] * len(refs)
    finally:
        store.close()


# ---------------------------------------------------------------------- refusing bad reads


def test_a_ref_whose_byte_size_disagrees_is_refused_with_both_specs(
    mooncake_master: MooncakeMaster, client: MooncakeClient
) -> None:
    store = mooncake_store(mooncake_master, client)
    ref = store.put("size", eagle_sample(53))
    specs = dict(ref.feature_specs)
    specs["input_ids"] = FeatureSpec("input_ids", (16,), "int32")  # half the bytes
    lying = dataclasses.replace(ref, feature_specs=specs)
    before = store.health()
    with pytest.raises(SchemaMismatchError, match=r"input_ids.*int64\[16\].*int32\[16\]"):
        store.get(lying, names=["input_ids"])
    assert baseline(store.health()) == baseline(before)
    store.abort("size", "done")


def test_key_never_overwritten_stale(
    mooncake_master: MooncakeMaster, client: MooncakeClient, reader: MooncakeClient
) -> None:
    # A restarted producer (a fresh instance, same sample ids) never reuses an old key.
    first = mooncake_store(mooncake_master, client)
    old = first.put("restart", eagle_sample(54))
    second = mooncake_store(mooncake_master, client)
    new = second.put("restart", eagle_sample(55))
    assert new.generation > old.generation and set(new.feature_keys).isdisjoint(
        set(old.feature_keys.values())
    )
    got_old, h_old = first.get(old)
    got_new, h_new = second.get(new)
    assert same_bits(got_old["input_ids"], eagle_sample(54)["input_ids"])
    assert same_bits(got_new["input_ids"], eagle_sample(55)["input_ids"])
    first.release(h_old)
    second.release(h_new)

    # A leftover object at the very key a put is about to write: refused, left untouched.
    store = mooncake_store(mooncake_master, client)
    store._last_generation = time.time_ns() // 1000 + 10**12  # pin the next generation
    planned = store._last_generation + 1
    squatter = torch.arange(4, dtype=torch.uint8)
    stale_key = wire.manifest_key("squat", planned)
    reader.put([ObjectIO(stale_key, (Region(squatter.data_ptr(), 4),))])
    before = store.health()
    with pytest.raises(CorruptRecordError, match=rf"key '{stale_key}' already exists"):
        store.put("squat", eagle_sample(56))
    assert store.health() == before
    assert reader.object_bytes(stale_key) == bytes(range(4))
    ref = store.put("squat", eagle_sample(56))  # the next generation is free
    assert ref.generation == planned + 1
    store.abort("squat", "done")
    assert reader.remove([stale_key], force=True).complete


def test_an_object_of_another_sample_under_a_refs_key_is_refused(
    mooncake_master: MooncakeMaster, client: MooncakeClient, reader: MooncakeClient
) -> None:
    store = mooncake_store(mooncake_master, client)
    ref = store.put("victim", {"x": torch.arange(8, dtype=torch.int64)})
    spec = ref.feature_specs["x"]
    # Plant, under a key of a generation nobody wrote yet, bytes that claim another identity.
    forged_gen = ref.generation + 10**9
    header = torch.frombuffer(
        bytearray(wire.feature_header("other", forged_gen, spec)), dtype=torch.uint8
    )
    data = torch.arange(8, dtype=torch.int64)
    key = wire.feature_key("victim", forged_gen, "x")
    reader.put(
        [ObjectIO(key, (Region(header.data_ptr(), header.numel()), Region(data.data_ptr(), 64)))]
    )
    forged = dataclasses.replace(ref, generation=forged_gen)
    with pytest.raises(CorruptRecordError, match="belongs to .*'other'.*refusing it"):
        store.get(forged)
    assert store.health().active_leases == 0
    assert reader.remove([key], force=True).complete
    store.abort("victim", "done")


# ---------------------------------------------------------------------- Mooncake read leases


def test_abort_under_another_readers_lease_frees_at_once_by_default(
    mooncake_master: MooncakeMaster, client: MooncakeClient, reader: MooncakeClient
) -> None:
    store = mooncake_store(mooncake_master, client)
    tensors = eagle_sample(57)
    ref = store.put("leased", tensors)
    assert same_bits(read_like_another_process(reader, ref, "loss_mask"), tensors["loss_mask"])
    feature = wire.feature_key("leased", ref.generation, "loss_mask")
    assert reader.remove([feature], force=False).leased == (feature,)  # the lease is real
    store.abort("leased", "dropped")
    health = store.health()
    assert (health.resident_samples, health.pending_frees, health.resident_bytes) == (0, 0, 0)
    assert client.exists(keys_of(store, ref)) == [False] * 5


def test_with_a_lease_grace_a_leased_free_waits_then_is_forced(
    mooncake_master: MooncakeMaster, client: MooncakeClient, reader: MooncakeClient
) -> None:
    clock = FakeClock()
    store = mooncake_store(mooncake_master, client, lease_grace_s=30.0, clock=clock)
    tensors = eagle_sample(58)
    ref = store.put("graced", tensors)
    read_like_another_process(reader, ref, "hidden_state")
    store.abort("graced", "dropped")
    health = store.health()
    assert (health.pending_frees, health.resident_bytes) == (
        1,
        sum(t.nbytes for t in tensors.values()),
    )
    with pytest.raises(NotFoundError, match="released or aborted"):
        store.get(ref)  # the tombstone refuses it while Mooncake still holds it
    report = store.gc()
    assert (report.retried_frees, report.failed_frees) == (1, 1)  # still leased, within grace
    assert reader.exists([wire.feature_key("graced", ref.generation, "hidden_state")]) == [True]
    clock.advance(31)
    report = store.gc()
    assert (report.failed_frees, report.freed_samples) == (0, 1)
    assert store.health().pending_frees == 0
    assert reader.exists(keys_of(store, ref)) == [False] * 5


def test_drain_forces_out_leased_frees_now(
    mooncake_master: MooncakeMaster, client: MooncakeClient, reader: MooncakeClient
) -> None:
    store = mooncake_store(mooncake_master, client, lease_grace_s=30.0)
    refs = [store.put(f"dr{i}", eagle_sample(70 + i)) for i in range(3)]
    for ref in refs:
        read_like_another_process(reader, ref, "input_ids")
        store.abort(ref.sample_id, "dropped")
    assert store.health().pending_frees == 3
    assert store.drain(timeout_s=2) == 3
    health = store.health()
    assert (health.resident_samples, health.pending_frees) == (0, 0)
    assert not any(reader.exists([k for ref in refs for k in keys_of(store, ref)]))


def test_a_free_never_runs_under_a_read_in_flight_here(
    mooncake_master: MooncakeMaster, client: MooncakeClient
) -> None:
    store = mooncake_store(mooncake_master, client)
    assert isinstance(store, MooncakeFeatureStore)
    ref = store.put("inflight", eagle_sample(59))
    with store._read_in_flight("inflight", ref.generation):  # another thread is mid-transfer
        store.abort("inflight", "dropped")
        assert store.health().pending_frees == 1
        assert client.exists(keys_of(store, ref)) == [True] * 5
    report = store.gc()  # the read is over: the retry frees it
    assert (report.freed_samples, report.failed_frees) == (1, 0)
    assert store.health().pending_frees == 0


def test_drain_that_cannot_finish_fails_loudly_and_keeps_its_bookkeeping(
    mooncake_master: MooncakeMaster, client: MooncakeClient
) -> None:
    # Injected failures stand in for a removal Mooncake keeps refusing (the real cause, a dead
    # master, is the next test).
    faults = FaultInjector()
    store = mooncake_store(mooncake_master, client, faults=faults)
    ref = store.put("stuck", eagle_sample(61))
    faults.fail_next_deletes(2)
    store.abort("stuck", "dropped")
    with pytest.raises(BackendUnavailableError, match="drain gave up after 0 s .*1 free"):
        store.drain(timeout_s=0)
    assert store.health().pending_frees == 1
    with pytest.raises(NotFoundError, match="released or aborted"):
        store.get(ref)
    assert store.drain(timeout_s=1) == 1
    assert store.health().pending_frees == 0
    assert client.exists(keys_of(store, ref)) == [False] * 5


# ---------------------------------------------------------------------- across processes

PRODUCER = """
import json
store = open_store(sys.argv[1], segment="64MiB", buffer="8MiB")
ref = store.put("xp", sample(7))
print(dumps(ref), flush=True)
sys.stdin.readline()  # the consumer may read from this process's segment: stay up until it is done
health = store.health()
print(json.dumps([health.resident_samples, health.resident_bytes]), flush=True)
store.close()
"""


def prelude_helpers() -> dict[str, Any]:
    """``sample`` and ``digest`` exactly as the child processes define them."""
    namespace: dict[str, Any] = {}
    exec(PRELUDE, namespace)
    return namespace


def test_producer_process_puts_consumer_process_gets_by_ref_alone(
    mooncake_master: MooncakeMaster, client: MooncakeClient
) -> None:
    helpers = prelude_helpers()
    consumer = mooncake_store(mooncake_master, client)  # this test process consumes
    with subprocess.Popen(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(PRODUCER), mooncake_master.uri],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as producer:
        try:
            assert producer.stdout is not None
            ref_json = producer.stdout.readline().strip()
            assert ref_json, "the producer printed no ref"
            ref = loads(ref_json, SampleRef)  # all the consumer gets is the ref's JSON
            got, handle = consumer.get(ref)
            assert helpers["digest"](got) == helpers["digest"](helpers["sample"](7))
            consumer.release(handle)  # consume-once: the consumer's release frees it
            with pytest.raises(NotFoundError, match="released or aborted"):
                consumer.get(ref)
            assert client.exists(keys_of(consumer, ref)) == [False] * 5
            rest, err = producer.communicate("done\n", timeout=60)
            assert producer.returncode == 0, err
            # the producer sees its sample freed by the consumer: nothing resident any more
            assert json.loads(rest.splitlines()[0]) == [0, 0]
        finally:
            if producer.poll() is None:
                producer.kill()
    assert consumer.health().resident_samples == 0


def test_abort_of_a_sample_this_instance_never_saw_frees_it_cluster_wide(
    mooncake_master: MooncakeMaster, client: MooncakeClient, reader: MooncakeClient
) -> None:
    producer = mooncake_store(mooncake_master, client)
    other = mooncake_store(mooncake_master, client)  # e.g. the control plane dropping it
    first = producer.put("drop", eagle_sample(80))
    second = producer.put("drop+1", eagle_sample(81))  # a neighbour the pattern must spare
    other.abort("drop", "partial_window")
    assert reader.exists(keys_of(producer, first)) == [False] * 5
    assert reader.exists(keys_of(producer, second)) == [True] * 5
    assert producer.health().resident_samples == 1  # it notices "drop" is gone
    with pytest.raises(NotFoundError, match="was released or aborted"):
        producer.get(first)
    producer.abort("drop+1", "done")


MASTER_DIES = """
import json, os, signal
from dataflow.contracts import BackendUnavailableError, NotFoundError
store = open_store(sys.argv[1], segment="16MiB", buffer="8MiB", lease_grace_s=30.0)
ref = store.put("doomed", sample(3))
_, handle = store.get(ref)
store.abort("doomed", "dropped")  # our own read lease: parked for the grace period
os.kill(int(sys.argv[2]), signal.SIGKILL)
out = {}
try:
    store.drain(timeout_s=0.5)
except BackendUnavailableError as exc:
    out["drain"] = str(exc)
out["pending"] = store.health().pending_frees
try:
    store.get(ref)
except NotFoundError as exc:
    out["get"] = str(exc)
print(json.dumps(out), flush=True)
os._exit(0)  # a client whose master died takes ~15 s to close; nothing to keep here
"""


def test_drain_against_a_dead_master_fails_loudly_and_keeps_its_bookkeeping(
    start_mooncake_master: MasterFactory,
) -> None:
    master = start_mooncake_master()
    out = json.loads(run_child(MASTER_DIES, master.uri, str(master.pid)))
    assert "drain gave up after 0.5 s" in out["drain"]
    assert "'doomed' generation" in out["drain"] and "RPC_FAIL" in out["drain"]
    assert "bookkeeping is kept" in out["drain"]
    assert out["pending"] == 1
    assert "released or aborted" in out["get"]
    assert not master.alive


OFFLINE_PRODUCER = """
store = open_store(sys.argv[1], segment="0", buffer="8MiB")  # mounts nothing of its own
print(dumps(store.put("offline", sample(11))), flush=True)
store.close()
"""


def test_a_producer_that_mounts_nothing_may_exit_before_its_samples_are_read(
    mooncake_master: MooncakeMaster, client: MooncakeClient
) -> None:
    helpers = prelude_helpers()
    ref = loads(run_child(OFFLINE_PRODUCER, mooncake_master.uri).strip(), SampleRef)
    consumer = mooncake_store(mooncake_master, client)  # its client mounts the segment
    got, handle = consumer.get(ref)  # the producer process is gone by now
    assert helpers["digest"](got) == helpers["digest"](helpers["sample"](11))
    consumer.release(handle)
    assert client.exists(keys_of(consumer, ref)) == [False] * 5


def test_abort_racing_reads_in_other_threads_never_hands_out_torn_bytes(
    mooncake_master: MooncakeMaster, client: MooncakeClient
) -> None:
    import threading

    store = mooncake_store(mooncake_master, client)
    base = baseline(store.health())
    outcomes: list[str] = []
    for i in range(12):
        tensors = eagle_sample(90 + i, tokens=256, hidden=1024)  # ~2 MiB: a read takes a while
        ref = store.put(f"race{i}", tensors)

        def read(ref: Any = ref, tensors: dict[str, torch.Tensor] = tensors) -> None:
            try:
                got, handle = store.get(ref)
            except NotFoundError:
                outcomes.append("refused")
                return
            exact = all(same_bits(got[n], t) for n, t in tensors.items())
            outcomes.append("exact" if exact else "TORN")
            store.release(handle)

        reader_thread = threading.Thread(target=read)
        reader_thread.start()
        time.sleep(0.001 * (i % 4))
        store.abort(f"race{i}", "dropped while being read")
        reader_thread.join()
    assert len(outcomes) == 12 and "TORN" not in outcomes, outcomes
    store.gc()  # frees parked because a read was in flight when the abort came
    assert baseline(store.health()) == base


def test_a_restarted_master_has_lost_earlier_objects_and_serves_new_ones(
    start_mooncake_master: MasterFactory,
) -> None:
    # The master keeps object metadata in memory: after a crash and restart a feature put
    # before is a clear NotFoundError (never other bytes; until the client has reconnected,
    # BackendUnavailableError), and the same client puts and gets again once it has
    # re-mounted its segment with the new master.
    master = start_mooncake_master()
    store = open_store(master.uri, segment="64MiB", buffer="16MiB")
    try:
        before = store.put("before", eagle_sample(61))
        master.restart()
        deadline = time.monotonic() + 30
        while True:
            try:
                store.get(before)
                pytest.fail("a feature the restarted master never knew was read")
            except BackendUnavailableError:
                assert time.monotonic() < deadline, "the client never reached the new master"
                time.sleep(0.2)
            except NotFoundError as exc:
                assert "OBJECT_NOT_FOUND" in str(exc)
                break
        while True:
            try:
                after = store.put("after", eagle_sample(62))
                break
            except (BackendUnavailableError, CapacityExceededError):
                assert time.monotonic() < deadline, "the client never re-mounted its segment"
                time.sleep(0.2)
        got, handle = store.get(after)
        expected = eagle_sample(62)
        assert got.keys() == expected.keys()
        assert all(same_bits(got[name], value) for name, value in expected.items())
        store.release(handle)
    finally:
        store.close()
