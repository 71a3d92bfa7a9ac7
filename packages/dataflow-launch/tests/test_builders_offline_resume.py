"""Colocated offline: epochs re-iterate the same feature files, and a run stopped early resumes
from its checkpoint to the end with every sample trained once per epoch (in process)."""

from __future__ import annotations

from collections import Counter

from run_helpers import TINY_RUN, read_jsonl

from dataflow.launch.builders.offline import run_colocated_offline
from dataflow.launch.config import load_config
from dataflow.launch.run_dir import RunDir


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
