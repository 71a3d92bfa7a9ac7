"""Ulysses sequence parallelism on gloo: SP=2 gives the SP=1 loss, metrics and gradients.

Two real processes (this file run as a script, one per rank) join a gloo group on a free
loopback port, shard each sequence, run the objective and SUM-reduce their gradients; the test
process computes the same thing on one process and compares. Tolerance (fp32): loss and metrics
``rtol=1e-5, atol=1e-6``, gradients ``rtol=1e-4, atol=1e-6`` (only summation order differs).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from dataflow.contracts.errors import InvalidInputError
from dataflow.train.eagle3 import Eagle3Config, Eagle3Objective, build_vocab_map

H, VOCAB, DRAFT_VOCAB = 32, 97, 31

# (name, kv heads, padded length, TTT steps, sample lengths): "wide" has kv heads divisible by
# SP and 8-token shards; "narrow" repeats kv heads before the all-to-all and has 3-token shards,
# shorter than the TTT look-ahead, so shifts reach across and past the last shard.
CASES = [("wide", 2, 16, 3, [16, 11]), ("narrow", 1, 6, 4, [6, 5])]


def build(kv_heads: int, length: int, ttt: int, lengths: list[int], exchange=None):
    cfg = Eagle3Config(
        hidden_size=H,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=8,
        vocab_size=VOCAB,
        draft_vocab_size=DRAFT_VOCAB,
        target_layers=(1, 2, 4),
        ttt_length=ttt,
    )
    objective = Eagle3Objective(cfg, seed=11, sequence_parallel=exchange)
    gen = torch.Generator().manual_seed(length)
    batch_size = len(lengths)
    head = objective.target_head.weight
    hidden = torch.randn(batch_size, length, H, generator=gen) * 3
    counts = torch.bincount((hidden @ head.T).argmax(-1)[:, ::2].flatten(), minlength=VOCAB)
    objective.set_vocab_map(*build_vocab_map(counts, VOCAB, DRAFT_VOCAB))
    attention = torch.zeros(batch_size, length, dtype=torch.int64)
    for b, n in enumerate(lengths):
        attention[b, :n] = 1
    loss_mask = attention.clone()
    loss_mask[:, :2] = 0
    pad = (attention == 0)[..., None]
    batch = {
        "input_ids": torch.randint(0, VOCAB, (batch_size, length), generator=gen) * attention,
        "loss_mask": loss_mask,
        "attention_mask": attention,
        "hidden_state": hidden.masked_fill(pad, 0),
        "aux_hidden_state": torch.randn(batch_size, length, 3 * H, generator=gen).masked_fill(
            pad, 0
        ),
    }
    return objective, batch


def run(objective, batch) -> dict[str, torch.Tensor]:
    out = objective(batch)
    out.loss.backward()
    result = {f"grad/{n}": p.grad for n, p in objective.draft.named_parameters()}
    result.update({f"metric/{k}": v for k, v in out.metrics.items()})
    result["loss"] = out.loss.detach()
    result["sample_loss"] = out.sample_loss
    return result


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One SP rank: shard, run, SUM-reduce loss and gradients; rank 0 saves the results."""
    import torch.distributed as dist

    from dataflow.train.parallel.ulysses import UlyssesExchange, all_to_all, shard_sequence

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        results = {}
        exchange = UlyssesExchange()
        for name, kv, length, ttt, lengths in CASES:
            objective, batch = build(kv, length, ttt, lengths, exchange)
            result = run(objective, shard_sequence(batch, exchange))
            for key, value in result.items():
                if key.startswith("grad/") or key == "loss":
                    dist.all_reduce(value, op=dist.ReduceOp.SUM)
                results[f"{name}/{key}"] = value
        # The all-to-all pair is an exact inverse, and its backward routes gradients home.
        x = torch.arange(2 * 3 * 4 * 2, dtype=torch.float32).view(2, 3, 4, 2) + 100 * rank
        x.requires_grad_(True)
        heads = all_to_all(x, None, scatter_dim=2, gather_dim=1)
        back = all_to_all(heads, None, scatter_dim=1, gather_dim=2)
        (heads * heads).sum().backward()
        results["a2a/heads"] = heads.detach()
        results["a2a/roundtrip_equal"] = torch.tensor(torch.equal(back, x))
        results["a2a/grad_equal"] = torch.tensor(torch.equal(x.grad, 2 * x.detach()))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sequence_parallel_two_ranks_match_one_rank(tmp_path: Path):
    from dataflow_testing.ports import free_port
    from train_support import run_rank_processes

    port = free_port()
    run_rank_processes(__file__, lambda rank: [str(rank), "2", str(port), str(tmp_path)], 2, 120)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, kv, length, ttt, lengths in CASES:
        expected = run(*build(kv, length, ttt, lengths))
        for key, value in expected.items():
            for r, got in enumerate(ranks):
                tol = {"rtol": 1e-4, "atol": 1e-6} if key.startswith("grad/") else {}
                torch.testing.assert_close(
                    got[f"{name}/{key}"].to(value.dtype),
                    value,
                    rtol=tol.get("rtol", 1e-5),
                    atol=tol.get("atol", 1e-6),
                    msg=f"{name}/{key} on rank {r}",
                )
        assert expected["loss"] > 0 and expected["metric/acceptance_rate_0"] > 0

    # Rank r holds heads [2r, 2r+2) of all 6 positions, positions 0-2 from rank 0's chunk.
    inputs = [torch.arange(48, dtype=torch.float32).view(2, 3, 4, 2) + 100 * r for r in range(2)]
    for r, got in enumerate(ranks):
        expected_heads = torch.cat([x[:, :, 2 * r : 2 * r + 2] for x in inputs], dim=1)
        assert torch.equal(got["a2a/heads"], expected_heads)
        assert bool(got["a2a/roundtrip_equal"]) and bool(got["a2a/grad_equal"])


def test_shard_sequence_refuses_a_length_not_divisible_by_the_degree():
    class TwoRanks:
        world, rank = 2, 0

    with pytest.raises(InvalidInputError, match="'input_ids' of shape \\(1, 5\\)"):
        from dataflow.train.parallel.ulysses import shard_sequence

        shard_sequence({"input_ids": torch.zeros(1, 5)}, TwoRanks())


def test_objective_refuses_heads_not_divisible_by_the_degree():
    class ThreeRanks:
        world, rank = 3, 0

    with pytest.raises(InvalidInputError, match="multiple of the sequence-parallel degree \\(3\\)"):
        build(2, 6, 2, [6], exchange=ThreeRanks())


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
