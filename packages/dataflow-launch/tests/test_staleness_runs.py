"""Staleness in real runs (CLI, real processes): it finishes in all four topologies' example
configs; online, with the gate on but nothing stale the loss curve is the gate-off one, bit for
bit; offline (no draft served: target matching) exactly the other target's samples are dropped.
"""

from __future__ import annotations

from pathlib import Path

from run_helpers import EXAMPLES, TINY_RUN, cli, fresh_shm_name, read_jsonl, sets, trained_ids

SMALL = [*TINY_RUN, "data.max_prompts=16", "producer.workers=1", "trainer.checkpoint_every=2"]


def _run(example: str, out: Path, *extra: str) -> list[dict]:
    result = cli("run", EXAMPLES / f"{example}.yaml", *sets(f"run.out_dir={out}", *SMALL, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return read_jsonl(out / "metrics.jsonl")


def test_gate_on_with_nothing_stale_gives_the_gate_off_loss_curve(tmp_path):
    off = _run("colocated_online", tmp_path / "off")
    on = _run(
        "colocated_online",
        tmp_path / "on",
        "staleness.enabled=true",
        "staleness.max_draft_lag=1000",
    )
    assert len(off) == 8
    assert [(r["step"], r["loss"]) for r in on] == [(r["step"], r["loss"]) for r in off]
    assert trained_ids(tmp_path / "on") == trained_ids(tmp_path / "off")
    last = on[-1]
    assert last["staleness/dropped"] == 0 and last["staleness/passed"] == 16
    assert last["staleness/weight_version"] >= 4  # step0 + checkpoints at steps 2, 4, 6, 8
    assert "staleness/dropped" not in off[-1]
    assert (tmp_path / "on" / "plots" / "staleness.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "off" / "plots" / "staleness.png").exists()


def test_staleness_on_finishes_in_the_disaggregated_online_example(tmp_path):
    out = tmp_path / "disagg"
    with fresh_shm_name() as name:
        rows = _run(
            "disaggregated_online",
            out,
            f"store.uri=shm://{name}",
            f"ledger.uri=sqlite://{out}/ledger.sqlite",
            "staleness.enabled=true",
            "staleness.publish_every=1",
        )
    assert rows and all("staleness/draft_lag_mean" in r for r in rows)
    status = cli("status", f"sqlite://{out}/ledger.sqlite", "--json")
    assert status.returncode == 0, status.stderr
    import json

    record = json.loads(status.stdout)
    trained = len(trained_ids(out))
    dropped = sum(record["dropped_reasons"].values())
    assert trained + dropped == 16 and trained > 0
    assert record["drift"]["mean"] is not None
    assert record["latest_weight_order"] >= 2


def test_stale_samples_are_dropped_in_a_real_run_and_the_rest_trained_once(tmp_path):
    out = tmp_path / "stale"
    rows = _run(
        "colocated_online",
        out,
        "staleness.enabled=true",
        "staleness.max_draft_lag=0",
        "staleness.publish_every=1",
        "staleness.admission=false",  # let the producer run ahead, so samples age
    )
    trained = trained_ids(out)
    last = rows[-1]
    dropped = int(last["staleness/dropped"])
    assert len(trained) == len(set(trained)) == last["staleness/passed"]
    assert dropped > 0 and last["staleness/draft_lag_max"] >= 1
    assert last["staleness/dropped/draft_lag>0"] == dropped
    # every prompt ends trained, dropped as stale, or in the dropped partial tail (< a window)
    assert 16 - 2 < len(trained) + dropped <= 16
    assert (out / "weights").is_dir()  # publish_every saves the published weights


# -- offline: no draft is served, so staleness is target matching over the feature set ------

OFFLINE = [*TINY_RUN, "data.max_prompts=6", "data.passes=1", "staleness.enabled=true"]


def _run_offline(example: str, out: Path, *extra: str):
    return cli("run", EXAMPLES / f"{example}.yaml", *sets(f"run.out_dir={out}", *OFFLINE, *extra))


def test_staleness_on_finishes_in_the_colocated_offline_example_and_drops_other_targets(
    tmp_path,
):
    import json

    out, features = tmp_path / "first", tmp_path / "features"
    store = f"store.uri=file://{features}"
    result = _run_offline("colocated_offline", out, store)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "staleness.json").read_text())
    assert (record["passed"], record["dropped"]) == (6, 0)
    assert len(trained_ids(out)) == 6
    targets = json.loads((features / "target.json").read_text())
    assert sorted(targets) == sorted(p.stem for p in features.glob("*.safetensors"))
    assert set(targets.values()) == {record["target_version"]}

    # two files recorded as another target's: exactly those are dropped, the rest trained once
    other = sorted(targets)[:2]
    (features / "target.json").write_text(
        json.dumps({k: ("old-target" if k in other else v) for k, v in targets.items()})
    )
    result = _run_offline("colocated_offline", tmp_path / "mixed", store)
    assert result.returncode == 0, result.stderr[-3000:]
    mixed = json.loads((tmp_path / "mixed" / "staleness.json").read_text())
    assert (mixed["passed"], mixed["dropped"]) == (4, 2)
    assert mixed["dropped_reasons"] == {"target_version_mismatch": 2}
    assert mixed["other_targets"] == {"old-target": 2}
    trained = trained_ids(tmp_path / "mixed")
    assert sorted(trained) == sorted(set(targets) - set(other))

    # a run whose target captured none of the files fails fast, naming the setting
    result = _run_offline("colocated_offline", tmp_path / "foreign", store, "target.version=v2")
    assert result.returncode != 0
    assert "staleness.require_target_match: all 6 offline samples" in result.stderr
    assert "than this run's 'v2'" in result.stderr
    assert not (tmp_path / "foreign" / "metrics.jsonl").exists()


def test_staleness_on_finishes_in_the_disaggregated_offline_example(tmp_path):
    import json

    out = tmp_path / "disagg-offline"
    result = _run_offline(
        "disaggregated_offline",
        out,
        f"store.uri=dir://{out}/store",
        f"ledger.uri=sqlite://{out}/ledger.sqlite",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "staleness.json").read_text())
    assert (record["passed"], record["dropped"]) == (6, 0)
    assert len(trained_ids(out)) == 6
