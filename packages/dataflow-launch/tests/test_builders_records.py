"""The run records and the mode-to-policy mapping, in process (fast)."""

from __future__ import annotations

import json

import pytest

from dataflow.contracts import CorruptRecordError, InvalidInputError
from dataflow.control import ReleasePolicy, open_ledger
from dataflow.launch.builders.preflight import check_fresh_ledger
from dataflow.launch.builders.roles import control_plan
from dataflow.launch.config import load_config
from dataflow.launch.plots import write_plots
from dataflow.launch.trained_log import TrainedLog, rewind_jsonl


def test_trained_log_rewind_keeps_steps_up_to_the_checkpoint(tmp_path):
    log = TrainedLog(tmp_path / "trained.jsonl")
    for step in range(1, 6):
        log.append(step, [f"s{step}a", f"s{step}b"])
    assert log.rewind(3) == 2
    assert [row.step for row in log.read()] == [1, 2, 3]
    log.append(4, ["s4a", "s4b"])  # the retrained step is listed once
    assert log.sample_ids().count("s4a") == 1


def test_trained_log_skips_a_torn_last_line_and_rewind_drops_it(tmp_path):
    path = tmp_path / "trained.jsonl"
    path.write_text('{"step": 1, "sample_ids": ["a"]}\n{"step": 2, "sample_ids": ["b"')
    log = TrainedLog(path)
    assert [row.step for row in log.read()] == [1]
    log.rewind(5)
    assert path.read_text() == '{"step": 1, "sample_ids": ["a"]}\n'


def test_trained_log_refuses_a_corrupt_complete_line(tmp_path):
    path = tmp_path / "trained.jsonl"
    path.write_text('{"step": 1}\n')
    with pytest.raises(CorruptRecordError, match=r"trained.jsonl:1: not a trained-step line"):
        TrainedLog(path).read()
    assert path.read_text() == '{"step": 1}\n'


def test_rewind_jsonl_drops_metrics_after_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 5)))
    rewind_jsonl(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize(
    ("topology", "leases", "ledger", "release"),
    [
        ("colocated_online", True, "memory://", ReleasePolicy.ON_ACK),
        ("colocated_offline", False, "noop://", ReleasePolicy.ON_ACK),
        ("disaggregated_online", False, "sqlite://x/ledger.sqlite", ReleasePolicy.ON_CHECKPOINT),
    ],
)
def test_deployment_mode_picks_ledger_and_release_policy(topology, leases, ledger, release):
    config = load_config(None, [f"run.topology={topology}", "run.out_dir=x"])
    plan = control_plan(config, leases_prompts=leases)
    assert (plan.ledger_uri, plan.release) == (ledger, release)
    assert plan.durable is config.deployment_mode.durable
    # the lightweight plane frees a feature as the loader reads it; a durable one retains it
    assert plan.trainer_store_options == {"retain_on_release": plan.durable}


def test_fresh_run_refuses_a_ledger_that_holds_a_run(tmp_path):
    uri = f"sqlite://{tmp_path}/ledger.sqlite"
    ledger = open_ledger(uri)
    ledger.open_run("earlier", 2, resume=False)
    ledger.close()
    before = (tmp_path / "ledger.sqlite").read_bytes()
    config = load_config(None, [f"ledger.uri={uri}", f"run.out_dir={tmp_path}"])
    with pytest.raises(InvalidInputError, match=r"already holds run 'earlier'.*--resume"):
        check_fresh_ledger(config)
    assert (tmp_path / "ledger.sqlite").read_bytes() == before
    missing = load_config(None, [f"ledger.uri=sqlite://{tmp_path}/new.sqlite"])
    check_fresh_ledger(missing)
    assert not (tmp_path / "new.sqlite").exists()


def test_plots_have_one_curve_per_ttt_step(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = []
    for step in range(1, 6):
        row = {"step": step, "loss": 2.0 / step, "train/loss": 2.0 / step}
        for k in range(3):
            row |= {f"train/ploss_{k}": 1.0 / step, f"train/acc_{k}": 0.1 * step}
            row |= {f"train/acceptance_rate_{k}": 0.1 * step}
        rows.append(json.dumps(row) + "\n")
    metrics.write_text("".join(rows))
    written = write_plots(metrics, tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png", "accuracy.png", "acceptance.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)
