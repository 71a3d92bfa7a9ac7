"""Every topology and store gives the same per-step loss curve, bit for bit.

One dataset (the first ``PROMPTS`` shipped demo prompts), one seed, real processes through the
``dataflow-launch run`` CLI:

- colocated offline: features captured once into ``file://`` files, trained in one process;
- disaggregated offline through ``dir://`` and through ``mooncake://`` (a real master): a
  producer process ingests, a consumer process trains from the manifest;
- colocated online: producer thread + trainer on the lightweight plane (``memory://`` store
  and ledger, consume-once reads, ``on_ack``; asserted from its ``plane.json``);
- disaggregated online: producer and consumer processes, SQLite ledger + ``shm://`` store.

Offline runs train the loader's seeded shuffle of the feature set; online runs train in arrival
order. To compare the curves the online runs get the same prompts written in the order the
offline run trained them (read from its ``trained.jsonl``), so every path trains the same
prompt at every micro-step — which is then asserted from each run's own ``trained.jsonl``.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from equivalence_support import (
    STEPS,
    curve,
    max_delta,
    prompt_index,
    reordered_prompts,
    run_topology,
    trained_steps,
)

from dataflow.launch.data.prompts import demo_prompts_path
from dataflow.store.mooncake_client import MooncakeClient
from dataflow.store.mooncake_settings import settings_from_uri


def _prompt_order(run_dir: Path) -> list[int]:
    return [prompt_index(sid) for step in trained_steps(run_dir) for sid in step]


def _assert_same_curve(record, name: str, run_dir: Path, reference: Path, order: list[int]):
    ref, got = curve(reference), curve(run_dir)
    assert ref.steps == STEPS, ref
    assert got.steps == STEPS, (name, got)
    assert _prompt_order(run_dir) == order, f"{name} trained other prompts than the reference"
    delta = max_delta(got.loss, ref.loss)
    record(name, got.steps, delta, 0.0)
    assert got.loss == ref.loss, (name, got.loss, ref.loss)  # exact float equality, per step
    assert got.grad_norm == ref.grad_norm, (name, got.grad_norm, ref.grad_norm)


def test_reference_curve_is_not_trivial(offline_reference, record):
    ref = curve(offline_reference)
    record("colocated offline, file:// (reference)", ref.steps, 0.0, 0.0)
    assert ref.steps == STEPS
    # A gate over a flat or all-zero curve would prove nothing.
    assert all(v > 0 for v in ref.loss.values()), ref.loss
    assert len(set(ref.loss.values())) == len(ref.loss), ref.loss
    assert sorted(_prompt_order(offline_reference)) == list(range(2 * STEPS))


@pytest.mark.parametrize("store", ["dir", "mooncake"])
def test_disaggregated_offline_matches(offline_reference, store, tmp_path, record, request):
    overrides = [f"ledger.uri=sqlite://{tmp_path}/ledger.sqlite"]
    if store == "dir":
        run_topology(
            "disaggregated_offline", tmp_path, f"store.uri=dir://{tmp_path}/store", *overrides
        )
    else:
        # The offline producer exits before its features are read, so the memory they live in
        # must be another client's: this test process mounts it (a storage node), and both
        # roles mount none of their own.
        master = request.getfixturevalue("mooncake_master")
        storage_node = MooncakeClient.connect(
            settings_from_uri(master.uri, {"segment": "256MiB", "buffer": "16MiB"})
        )
        try:
            uri = f"{master.uri}?segment=0"
            run_topology("disaggregated_offline", tmp_path, f"store.uri={uri}", *overrides)
        finally:
            storage_node.close()
    name = f"disaggregated offline, {store}:// + SQLite (2 processes)"
    _assert_same_curve(record, name, tmp_path, offline_reference, _prompt_order(offline_reference))


@pytest.mark.parametrize("topology", ["colocated_online", "disaggregated_online"])
def test_online_matches(offline_reference, topology, tmp_path, record):
    data = reordered_prompts(offline_reference, tmp_path / "prompts.jsonl")
    extra = [f"data.path={data}"]
    if topology == "disaggregated_online":
        extra += [
            f"store.uri=shm://equiv-{uuid.uuid4().hex[:8]}",
            f"ledger.uri=sqlite://{tmp_path}/ledger.sqlite",
        ]
        name = "disaggregated online, shm:// + SQLite (2 processes)"
    else:
        extra += ["store.uri=memory://"]
        name = "colocated online, memory:// (1 process, 2 threads)"
    run_topology(topology, tmp_path / "run", *extra)
    if topology == "colocated_online":
        # the colocated leg ran on the lightweight plane, not on a durable one
        plane = json.loads((tmp_path / "run" / "plane.json").read_text())
        assert plane == {
            "deployment_mode": "local_colocated",
            "ledger": "memory://",
            "ledger_backend": "memory",
            "ledger_durable": False,
            "release": "on_ack",
            "store_retains_on_release": False,
            "resident_features_at_end": 0,
        }, plane
    # Online sample i is line i of the reordered file, i.e. the reference's i-th prompt.
    _assert_same_curve(record, name, tmp_path / "run", offline_reference, list(range(2 * STEPS)))
    reference_lines = demo_prompts_path().read_text(encoding="utf-8").splitlines()
    order = _prompt_order(offline_reference)
    written = data.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in written] == [json.loads(reference_lines[i]) for i in order]
