"""EAGLE3 objective under bf16 (CPU autocast and bf16 parameters) agrees with fp32.

The samples are the ones the trainer helper reported: sample ``1002`` (6 tokens) has a teacher
row whose two best target logits (one in the draft vocabulary, one not) differ by ~1e-4, below
bf16 resolution. A bf16 teacher flipped that argmax, admitting one more supervised position and
moving the sample's loss from 3.12 to 4.16.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import pytest
import torch
from train_support import sample_tensors, tiny_objective

from dataflow.train.eagle3 import Eagle3Objective, StepOutput

# bf16 keeps 8 mantissa bits (relative step 2^-8 ~ 4e-3); the draft's bf16 matmuls over a tiny
# model stay well inside 2e-2 of the fp32 loss, whereas a flipped teacher row moves it by ~30%.
BF16_RTOL = 2e-2
SEED = 3


def _collate(samples: list[dict[str, torch.Tensor]], length: int) -> dict[str, torch.Tensor]:
    """Right-pad with zeros to ``length`` and stack, with an attention mask (what the loader does)."""
    out: dict[str, list[torch.Tensor]] = {}
    for s in samples:
        s = {**s, "attention_mask": torch.ones_like(s["input_ids"])}
        for name, value in s.items():
            pad = value.new_zeros((1, length - value.shape[1], *value.shape[2:]))
            out.setdefault(name, []).append(torch.cat([value, pad], dim=1))
    return {name: torch.cat(rows) for name, rows in out.items()}


def _samples() -> list[dict[str, torch.Tensor]]:
    return [sample_tensors(1001, 9), sample_tensors(1002, 6)]


def _autocast() -> tuple[Eagle3Objective, Callable[[], AbstractContextManager[object]]]:
    return tiny_objective(seed=SEED), lambda: torch.autocast("cpu", dtype=torch.bfloat16)


def _bf16_params() -> tuple[Eagle3Objective, Callable[[], AbstractContextManager[object]]]:
    return tiny_objective(seed=SEED).to(torch.bfloat16), nullcontext


MODES = {"autocast": _autocast, "bf16_params": _bf16_params}


def _sample_loss(out: StepOutput) -> torch.Tensor:
    assert out.sample_loss is not None
    return out.sample_loss


def test_fixture_has_a_teacher_tie_that_bf16_logits_flip():
    """Precondition: without it the agreement tests below would not exercise the bug."""
    obj = tiny_objective(seed=SEED)
    hidden = sample_tensors(1002, 6)["hidden_state"][:, 1:]
    head = obj.target_head.weight
    fp32 = torch.nn.functional.linear(hidden, head).argmax(-1)
    bf16 = torch.nn.functional.linear(hidden.bfloat16(), head.bfloat16()).argmax(-1)
    flipped = fp32 != bf16
    assert flipped.any()
    # ... and the flip crosses the draft-vocabulary boundary, i.e. it changes supervision.
    assert (obj.draft.t2d[fp32] != obj.draft.t2d[bf16])[flipped].any()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_bf16_per_sample_loss_matches_fp32_in_a_padded_batch(mode):
    batch = _collate(_samples(), 12)
    reference = tiny_objective(seed=SEED)
    fp32 = reference(batch)
    obj, context = MODES[mode]()
    with context():
        low = obj(batch)
    torch.testing.assert_close(_sample_loss(low), _sample_loss(fp32), rtol=BF16_RTOL, atol=0)
    torch.testing.assert_close(
        low.loss.detach().float(), fp32.loss.detach(), rtol=BF16_RTOL, atol=0
    )
    # Supervision is decided in fp32, so bf16 counts exactly the same positions.
    for name, count in fp32.counts.items():
        if name.startswith(("acc_total_", "accept_total_")) or name == "tokens":
            assert torch.equal(low.counts[name], count), name


@pytest.mark.parametrize("mode", sorted(MODES))
def test_bf16_padded_row_equals_the_same_sample_unpadded(mode):
    samples = _samples()
    obj, context = MODES[mode]()
    with context():
        padded = _sample_loss(obj(_collate(samples, 12)))
        alone = [_sample_loss(obj(_collate([s], s["input_ids"].shape[1])))[0] for s in samples]
    for i, loss in enumerate(alone):
        torch.testing.assert_close(padded[i], loss, rtol=BF16_RTOL / 2, atol=0, msg=f"row {i}")


def test_attention_core_is_fp32_under_autocast():
    """Autocast must not lower the attention scores: the class guarantees fp32 softmaxes."""
    from dataflow.train.eagle3.layers import TTTCache

    gen = torch.Generator().manual_seed(7)
    batch, seq, heads, dim = 2, 12, 2, 8
    q = torch.randn(batch, seq, heads, dim, generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[1, 6:] = 0
    cache = TTTCache(mask)
    for _ in range(2):
        cache.keys.append(torch.randn(batch, seq, heads, dim, generator=gen))
        cache.values.append(torch.randn(batch, seq, heads, dim, generator=gen))
    attention = tiny_objective(seed=SEED).draft.midlayer.self_attn
    expected = attention._attend(q, cache)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention._attend(q, cache)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
