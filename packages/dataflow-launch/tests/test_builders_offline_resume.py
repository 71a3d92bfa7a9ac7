"""Colocated offline: epochs re-iterate the same feature files, and a run stopped early resumes
from its checkpoint to the end with every sample trained once per epoch (in process)."""

from __future__ import annotations

from collections import Counter

import pytest
from run_helpers import TINY_RUN, read_jsonl

from dataflow.launch.builders.offline import run_colocated_offline
from dataflow.launch.config import load_config
from dataflow.launch.run_dir import RunDir
from dataflow.train.metrics import tensorboard_available


def test_colocated_offline_stops_early_then_resumes_to_the_end(tmp_path):
    out = tmp_path / "run"
    base = [
        *TINY_RUN,
        "run.topology=colocated_offline",
        f"run.out_dir={out}",
        f"store.uri=file://{out}/features",
        "data.max_prompts=6",
        "data.passes=3",
        "trainer.total_steps=9",
    ]
    run_dir = RunDir(out).create()
    first = run_colocated_offline(
        load_config(None, [*base, "trainer.max_steps=4"]), run_dir, resume=False, progress=False
    )
    assert first.steps == 4
    second = run_colocated_offline(load_config(None, base), run_dir, resume=True, progress=False)
    assert second.steps == 9 and second.samples == 10  # steps 5..9, two samples each

    rows = read_jsonl(out / "trained.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 10))
    counts = Counter(sid for row in rows for sid in row["sample_ids"])
    assert sorted(counts.values()) == [3] * 6  # 3 epochs over 6 feature files
    assert [row["step"] for row in read_jsonl(out / "metrics.jsonl")] == list(range(1, 10))


@pytest.mark.skipif(
    not tensorboard_available(), reason="tensorboard not installed (the launch test extras add it)"
)
def test_a_run_writes_tensorboard_scalars_matching_its_metrics_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    base = [
        *TINY_RUN,
        "run.topology=colocated_offline",
        f"run.out_dir={out}",
        f"store.uri=file://{out}/features",
        "data.max_prompts=4",
        "data.passes=2",
        "trainer.total_steps=4",
    ]
    run_dir = RunDir(out).create()
    run_colocated_offline(
        load_config(None, [*base, "trainer.max_steps=2"]), run_dir, resume=False, progress=False
    )
    run_colocated_offline(load_config(None, base), run_dir, resume=True, progress=False)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [step for step, _ in losses] == [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [v for _, v in losses] == pytest.approx([row["loss"] for row in rows], rel=1e-6)
    assert "train/acceptance_rate_0" in events.Tags()["scalars"]
