"""Each topology's example config runs (tiny sizes, real processes), and colocated online and
disaggregated online give bit-identical per-step losses for the same seed and data.
"""

from __future__ import annotations

from pathlib import Path

from run_helpers import (  # noqa: F401 (shm_name is a fixture)
    EXAMPLES,
    TINY_RUN,
    cli,
    read_jsonl,
    sets,
    shm_name,
    shm_segments,
    trained_ids,
)

EQUIVALENCE = [
    *TINY_RUN,
    "run.id=equiv",
    "data.max_prompts=16",
    "producer.workers=1",
    "trainer.total_steps=8",
    "trainer.lr=0.002",
]


def run_example(name: str, out: Path, *overrides: str) -> None:
    result = cli("run", EXAMPLES / f"{name}.yaml", *sets(f"run.out_dir={out}", *overrides))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "== dataflow run summary" in result.stdout
    for plot in ("loss", "accuracy", "acceptance"):
        png = out / "plots" / f"{plot}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "draft" / "config.json").is_file()
    assert (out / "config.yaml").is_file()


def losses(out: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_jsonl(out / "metrics.jsonl")}


def test_colocated_online_and_disaggregated_online_losses_are_bit_identical(tmp_path, shm_name):
    colocated, disaggregated = tmp_path / "colocated", tmp_path / "disaggregated"
    run_example("colocated_online", colocated, *EQUIVALENCE)
    store = f"store.uri=shm://{shm_name}"
    ledger = f"ledger.uri=sqlite://{disaggregated}/ledger.sqlite"
    run_example("disaggregated_online", disaggregated, *EQUIVALENCE, store, ledger)
    a, b = losses(colocated), losses(disaggregated)
    assert len(a) == 8  # 16 prompts, windows of 2
    assert a == b  # exact float equality, step by step
    assert read_jsonl(colocated / "trained.jsonl") == read_jsonl(disaggregated / "trained.jsonl")
    assert shm_segments(shm_name) == []


def test_offline_examples_train_every_sample_once_per_epoch(tmp_path):
    for name in ("colocated_offline", "disaggregated_offline"):
        out = tmp_path / name
        extra = [f"store.uri=file://{out}/features"] if name == "colocated_offline" else []
        if name == "disaggregated_offline":
            extra = [f"store.uri=dir://{out}/store", f"ledger.uri=sqlite://{out}/ledger.sqlite"]
        run_example(name, out, *TINY_RUN, "data.max_prompts=6", "data.passes=2", *extra)
        ids = trained_ids(out)
        assert len(ids) == 12 and len(set(ids)) == 6  # 2 epochs over 6 samples
        assert [row["step"] for row in read_jsonl(out / "trained.jsonl")] == list(range(1, 7))
