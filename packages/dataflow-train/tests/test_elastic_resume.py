"""Elastic resume: a checkpoint of dp = N resumes at dp = M with the same global batch.

Real gloo ranks (separate processes started like torchrun does) on FSDP2 against one process
on ``LocalBackend``; 16 samples, batch 1, a global batch of 4 (dp 2 x accumulation 2 = dp 1 x
accumulation 4), 4 steps, clipping active at every step, fp32.

Tolerance: per-step losses and final weights within 1e-5 (absolute) of an uninterrupted run
on one rank. The steps train the same samples from the same weights; only the reduction order
differs: FSDP2 averages each rank's accumulated gradient over the ranks (reduce-scatter of
``(g0 + g2) / 2`` and ``(g1 + g3) / 2``), one rank sums ``g0/4 + g1/4 + g2/4 + g3/4`` in
micro-step order, and the clip norm is a sum of squared shard norms; fp32 rounding of these
orders differs by about 1e-7 relative, which four AdamW steps keep well below 1e-5 (the same
bound as tests/test_distributed.py).
"""

from __future__ import annotations

import pytest
import torch
from elastic_run import TOTAL_STEPS, launch, run_local
from train_support import put_samples

from dataflow.contracts import InvalidInputError
from dataflow.store import open_store
from dataflow.train.checkpoint_state import PerRank, RNGState
from dataflow.train.elastic import valid_data_parallel_sizes
from dataflow.train.loader import FeatureDataLoader

TOL = 1e-5


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted run: one rank, 4 steps."""
    return run_local(tmp_path_factory.mktemp("straight"), max_steps=TOTAL_STEPS)


def assert_matches(straight: dict, losses: dict[str, float], weights: dict) -> None:
    for step, loss in losses.items():
        assert abs(loss - straight["losses"][step]) <= TOL, (step, loss, straight["losses"])
    for name, values in straight["weights"].items():
        torch.testing.assert_close(
            torch.tensor(weights[name]), torch.tensor(values), rtol=0, atol=TOL
        )


def test_two_ranks_checkpoint_resumes_on_one_rank_with_the_same_curve(tmp_path, straight):
    _, (first, second) = launch(2, tmp_path, "--max-steps", "2")
    assert first is not None and "error" not in first, first
    assert first["losses"] == second["losses"] and sorted(first["losses"]) == ["1", "2"]

    # One rank with accumulation 2 would make a global batch of 2: refused, naming the fit.
    with pytest.raises(InvalidInputError, match="set accumulation_steps to 4 to keep it"):
        run_local(tmp_path, max_steps=TOTAL_STEPS, resume=True, accumulation=2)
    resumed = run_local(tmp_path, max_steps=TOTAL_STEPS, resume=True)

    assert resumed["resumed_from"] == 2 and sorted(resumed["losses"]) == ["3", "4"]
    assert_matches(straight, {**first["losses"], **resumed["losses"]}, resumed["weights"])


def test_one_rank_checkpoint_resumes_on_two_ranks_with_the_same_curve(tmp_path, straight):
    first = run_local(tmp_path, max_steps=2)
    assert sorted(first["losses"]) == ["1", "2"]

    _, (r0, r1) = launch(2, tmp_path, "--max-steps", str(TOTAL_STEPS), "--resume")

    assert r0 is not None and "error" not in r0, r0
    assert r0["resumed_from"] == 2 and sorted(r0["losses"]) == ["3", "4"]
    assert r1 is not None and r1["losses"] == r0["losses"]
    assert_matches(straight, {**first["losses"], **r0["losses"]}, r0["weights"])


def test_a_data_parallel_size_that_does_not_divide_the_global_batch_is_refused(tmp_path):
    run_local(tmp_path, max_steps=1, accumulation=3)  # one rank, a global batch of 3

    _, (r0, r1) = launch(2, tmp_path, "--max-steps", "2", "--resume", "--accumulation", "1")

    for report in (r0, r1):
        assert report is not None and report["error_type"] == "InvalidInputError", report
        assert "written by 1 data-parallel rank(s) with a global batch of 3" in report["error"]
        assert "data-parallel size 2 does not divide it" in report["error"]
        assert "(with batch_size 1: 1, 3)" in report["error"]
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*")) == ["step-00000001"]


def test_valid_data_parallel_sizes_are_the_divisors_in_whole_batches():
    assert valid_data_parallel_sizes(8, 1) == [1, 2, 4, 8]
    assert valid_data_parallel_sizes(8, 2) == [1, 2, 4]
    assert valid_data_parallel_sizes(6, 4) == []


def test_seek_positions_a_refs_loader_by_batch_count_and_refuses_past_the_end():
    store = open_store("memory://elastic-seek", retain_on_release=True)
    refs = put_samples(store, 8)
    loader = FeatureDataLoader(store, refs=refs, batch_size=1, world_size=2, num_epochs=2)
    loader.seek(5)  # 4 batches per epoch on this rank: epoch 1, batch 1
    assert (loader.state_dict()["epoch"], loader.state_dict()["batch"]) == (1, 1)
    expected = FeatureDataLoader(store, refs=refs, batch_size=1, world_size=2, num_epochs=2)
    skipped = iter(expected)
    for _ in range(5):
        next(skipped)
    assert next(iter(loader)).sample_ids == next(skipped).sample_ids
    fresh = FeatureDataLoader(store, refs=refs, batch_size=1, world_size=2)
    for bad in (-1, 5, 1.5):
        with pytest.raises(InvalidInputError):
            fresh.seek(bad)
    assert fresh.state_dict()["batch"] == 0  # unchanged


def test_a_rank_without_saved_state_is_refused_by_name():
    piece = PerRank(RNGState(), 3)
    with pytest.raises(InvalidInputError, match="no state for rank-3"):
        piece.load_state_dict({"rank-0": {}})
