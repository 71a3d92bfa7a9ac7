"""EAGLE3 objective behaviour: vocab map, frozen parts, masks, padding, metrics, determinism."""

from __future__ import annotations

import pytest
import torch

from dataflow.contracts.errors import InvalidInputError, SchemaMismatchError
from dataflow.train.eagle3 import (
    Eagle3Config,
    Eagle3Objective,
    build_vocab_map,
    count_keys,
    default_target_layers,
    draft_to_target_ids,
    metrics_from_counts,
)

H, VOCAB, DRAFT_VOCAB = 32, 97, 31


def config(ttt_length: int = 3, **overrides) -> Eagle3Config:
    fields = dict(
        hidden_size=H,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VOCAB,
        draft_vocab_size=DRAFT_VOCAB,
        target_layers=(1, 2, 4),
        ttt_length=ttt_length,
    )
    fields.update(overrides)
    return Eagle3Config(**fields)


def sample(length: int, seed: int) -> dict[str, torch.Tensor]:
    """One unpadded sample [1, length, ...]; loss mask on the last two thirds."""
    gen = torch.Generator().manual_seed(seed)
    loss = torch.zeros(1, length, dtype=torch.int64)
    loss[:, length // 3 :] = 1
    return {
        "input_ids": torch.randint(0, VOCAB, (1, length), generator=gen),
        "loss_mask": loss,
        "attention_mask": torch.ones(1, length, dtype=torch.int64),
        "hidden_state": torch.randn(1, length, H, generator=gen) * 3.0,
        "aux_hidden_state": torch.randn(1, length, 3 * H, generator=gen),
    }


def collate(samples: list[dict[str, torch.Tensor]], length: int) -> dict[str, torch.Tensor]:
    """Right-pad every sample with zeros to ``length`` and stack (what the loader does)."""
    out = {}
    for name in samples[0]:
        rows = []
        for s in samples:
            value = s[name]
            pad = value.new_zeros((1, length - value.shape[1], *value.shape[2:]))
            rows.append(torch.cat([value, pad], dim=1))
        out[name] = torch.cat(rows)
    return out


def objective(ttt_length: int = 3, seed: int = 0) -> Eagle3Objective:
    obj = Eagle3Objective(config(ttt_length), seed=seed)
    gen = torch.Generator().manual_seed(99)
    counts = torch.randint(0, 1000, (VOCAB,), generator=gen)
    obj.set_vocab_map(*build_vocab_map(counts, VOCAB, DRAFT_VOCAB))
    return obj


def loss_and_grads(obj: Eagle3Objective, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    obj.zero_grad(set_to_none=True)
    out = obj(batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in obj.draft.named_parameters()}


# -- vocabulary map ---------------------------------------------------------------------------


def test_vocab_map_keeps_the_most_frequent_tokens_in_target_order():
    counts = {5: 10, 2: 7, 9: 7, 3: 1, 7: 50}
    d2t, t2d = build_vocab_map(counts, target_vocab=12, draft_vocab=3)
    kept = draft_to_target_ids(d2t)
    assert kept.tolist() == [2, 5, 7]  # 9 ties with 2 at 7 and loses to the smaller id
    assert t2d.dtype == torch.bool and d2t.dtype == torch.int64
    assert t2d.nonzero().flatten().tolist() == kept.tolist()
    assert (d2t >= 0).all()


def test_vocab_map_from_token_ids_and_from_a_counts_tensor_agree():
    ids = [4, 4, 4, 1, 1, 8, 8, 8, 8, 0]
    counts = torch.bincount(torch.tensor(ids), minlength=10)
    from_ids = build_vocab_map(ids, 10, 3)
    from_tensor = build_vocab_map(counts, 10, 3)
    assert draft_to_target_ids(from_ids[0]).tolist() == [1, 4, 8]
    assert torch.equal(from_ids[0], from_tensor[0]) and torch.equal(from_ids[1], from_tensor[1])


def test_vocab_map_fills_up_with_unseen_tokens_deterministically():
    d2t, t2d = build_vocab_map([6, 6, 3], target_vocab=8, draft_vocab=4)
    assert draft_to_target_ids(d2t).tolist() == [0, 1, 3, 6]
    assert int(t2d.sum()) == 4


@pytest.mark.parametrize(
    ("counts", "target", "draft", "message"),
    [
        ([1, 2, 12], 10, 3, "token id 12 is outside the target vocabulary"),
        ({1: -3}, 10, 3, "count of token 1 must be a non-negative int"),
        ([1, 2], 10, 11, "draft_vocab (11) cannot exceed target_vocab (10)"),
        (torch.ones(9, dtype=torch.int64), 10, 3, "token counts have 9 entries"),
        (torch.ones(10), 10, 3, "token counts must be integers"),
        ([1], 10, 0, "draft_vocab must be a positive int"),
    ],
)
def test_vocab_map_refuses_bad_input(counts, target, draft, message):
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_vocab_map(counts, target, draft)


def test_set_vocab_map_refuses_inconsistent_maps_and_changes_nothing():
    obj = objective()
    before = (obj.draft.d2t.clone(), obj.draft.t2d.clone())
    d2t, t2d = build_vocab_map(list(range(40)), VOCAB, DRAFT_VOCAB)
    wrong = t2d.clone()
    wrong[90] = True
    with pytest.raises(InvalidInputError, match="d2t and t2d disagree"):
        obj.set_vocab_map(d2t, wrong)
    with pytest.raises(InvalidInputError, match=r"d2t must be int64 \[31\]"):
        obj.set_vocab_map(d2t[:5], t2d)
    assert torch.equal(obj.draft.d2t, before[0]) and torch.equal(obj.draft.t2d, before[1])


# -- config -----------------------------------------------------------------------------------


def test_captured_layer_rule_and_target_config_derivation():
    assert default_target_layers(32) == (1, 15, 28)
    with pytest.raises(InvalidInputError, match="at least 6 layers"):
        default_target_layers(4)
    cfg = Eagle3Config.from_target_config(
        {
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "vocab_size": 256,
            "num_hidden_layers": 12,
            "rope_theta": 5e5,
        },
        draft_vocab_size=64,
    )
    assert cfg.target_layers == (1, 5, 8)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta) == (16, 2, 5e5)
    assert cfg.ttt_length == 7 and cfg.step_weights[2] == pytest.approx(0.64)


def test_default_layers_must_be_distinct():
    # N = 6 gives (1, 2, 2): not three distinct layers, so it is refused.
    with pytest.raises(InvalidInputError, match="three distinct non-negative ints"):
        config(target_layers=default_target_layers(6))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"draft_vocab_size": 98}, "draft_vocab_size (98) exceeds"),
        ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads"),
        ({"target_layers": (1, 1, 2)}, "three distinct non-negative ints"),
        ({"ttt_length": 0}, "ttt_length must be a positive int"),
        ({"target_layers": (1, 2, 9), "num_target_layers": 8}, "must be < num_target_layers"),
    ],
)
def test_config_refuses_bad_values(overrides, message):
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config(**overrides)


def test_target_config_from_an_attribute_object():
    from types import SimpleNamespace

    target = SimpleNamespace(
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=None,
        vocab_size=300,
        num_hidden_layers=32,
        intermediate_size=None,
    )
    cfg = Eagle3Config.from_target_config(target, draft_vocab_size=100, ttt_length=4)
    assert cfg.target_layers == (1, 15, 28) and cfg.num_target_layers == 32
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (8, 8, 256)
    assert cfg.step_weights == pytest.approx((1.0, 0.8, 0.64, 0.512))


def test_target_config_missing_field_is_named():
    with pytest.raises(InvalidInputError, match="num_hidden_layers"):
        Eagle3Config.from_target_config(
            {"hidden_size": 8, "num_attention_heads": 2, "vocab_size": 9}, draft_vocab_size=4
        )


# -- frozen parts -----------------------------------------------------------------------------


def test_frozen_target_parts_get_no_gradient_and_are_not_trainable():
    obj = objective()
    trainable = list(obj.trainable_parameters())
    assert {id(p) for p in trainable} == {id(p) for p in obj.draft.parameters()}
    frozen = [obj.target_embedding.weight, obj.target_head.weight]
    assert all(not p.requires_grad for p in frozen)
    assert all(id(p) not in {id(q) for q in trainable} for p in frozen)
    obj(collate([sample(9, 1)], 9)).loss.backward()
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def test_init_from_target_copies_and_refuses_wrong_shapes():
    obj = objective()
    emb = torch.randn(VOCAB, H)
    head = torch.randn(VOCAB, H)
    obj.init_from_target(emb, head)
    assert torch.equal(obj.target_embedding.weight, emb)
    assert torch.equal(obj.target_head.weight, head)
    assert not obj.target_head.weight.requires_grad
    with pytest.raises(InvalidInputError, match=r"target lm_head weight has shape \(97, 31\)"):
        obj.init_from_target(emb * 2, torch.randn(VOCAB, 31))
    assert torch.equal(obj.target_embedding.weight, emb)


# -- masks and padding ------------------------------------------------------------------------


def test_inputs_at_unsupervised_teacher_rows_do_not_change_the_loss():
    obj = objective()
    batch = collate([sample(12, 2)], 12)
    base, _ = loss_and_grads(obj, batch)
    # hidden_state[j] is the teacher of row j-1; rows 0..3 have loss_mask 0.
    changed = {k: v.clone() for k, v in batch.items()}
    changed["hidden_state"][:, 1:5] = torch.randn(1, 4, H) * 10
    assert torch.equal(loss_and_grads(obj, changed)[0], base)
    # Control: the same change at a supervised row (teacher argmax in the draft vocab) does
    # change the loss.
    argmax = (batch["hidden_state"][0] @ obj.target_head.weight.T).argmax(-1)
    row = next(j for j in range(4, 11) if obj.draft.t2d[argmax[j + 1]])
    changed["hidden_state"][:, row + 1] = torch.randn(H) * 10
    assert not torch.equal(loss_and_grads(obj, changed)[0], base)


def test_padding_content_is_ignored():
    obj = objective()
    batch = collate([sample(12, 3), sample(8, 4)], 12)
    base_loss, base_grads = loss_and_grads(obj, batch)
    noisy = {k: v.clone() for k, v in batch.items()}
    pad = batch["attention_mask"] == 0
    noisy["input_ids"][pad] = 5
    noisy["loss_mask"][pad] = 1
    noisy["hidden_state"][pad] = 7.0
    noisy["aux_hidden_state"][pad] = -3.0
    loss, grads = loss_and_grads(obj, noisy)
    torch.testing.assert_close(loss, base_loss, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, base_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_padded_batch_gives_each_sample_its_unpadded_loss():
    obj = objective()
    a, b = sample(12, 5), sample(7, 6)
    alone = [obj(s) for s in (a, b)]
    padded = obj(collate([a, b], 16))
    for i, out in enumerate(alone):
        assert out.sample_loss is not None and padded.sample_loss is not None
        torch.testing.assert_close(padded.sample_loss[i], out.sample_loss[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.loss.double(), out.sample_loss[0], rtol=1e-5, atol=1e-6)
    # The batch loss is the token-weighted mean of the samples' losses.
    expected = (alone[0].loss * 12 + alone[1].loss * 7) / 19
    torch.testing.assert_close(padded.loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    # And a lone sample's loss and gradients do not depend on trailing padding.
    l1, g1 = loss_and_grads(obj, b)
    l2, g2 = loss_and_grads(obj, collate([b], 13))
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-7, msg=name)


def test_loss_denominator_override_rescales_the_loss():
    obj = objective()
    batch = sample(10, 7)
    default = obj(batch).loss
    assert obj(batch, loss_denominator=20.0).loss.item() == pytest.approx(
        default.item() * 10 / 20, rel=1e-6
    )


# -- metrics ----------------------------------------------------------------------------------


def test_metrics_have_every_key_as_finite_scalars_in_range():
    ttt = 3
    obj = objective(ttt)
    out = obj(collate([sample(12, 8), sample(9, 9)], 12))
    expected = {"loss", "acc", "acceptance_rate", "simulated_acceptance_length"}
    for k in range(ttt):
        expected |= {f"ploss_{k}", f"acc_{k}", f"acceptance_rate_{k}"}
    assert set(out.metrics) == expected
    assert set(out.counts) == set(count_keys(ttt))
    for name, value in out.metrics.items():
        assert value.dim() == 0 and torch.isfinite(value) and not value.requires_grad, name
    for k in range(ttt):
        assert 0 <= out.metrics[f"acc_{k}"] <= 1
        assert 0 < out.metrics[f"acceptance_rate_{k}"] <= 1
        assert out.metrics[f"ploss_{k}"] > 0
    assert 0 <= out.metrics["simulated_acceptance_length"] <= ttt
    weighted = sum(0.8**k * out.metrics[f"ploss_{k}"] for k in range(ttt))
    assert out.metrics["loss"].item() == pytest.approx(float(weighted), rel=1e-9)
    assert out.metrics["loss"].item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_metrics_from_summed_counts_pool_over_ranks():
    counts_a = {key: torch.tensor(1.0, dtype=torch.float64) for key in count_keys(2)}
    counts_b = {key: torch.tensor(3.0, dtype=torch.float64) for key in count_keys(2)}
    counts_b["acc_correct_0"] = torch.tensor(0.0, dtype=torch.float64)
    summed = {k: counts_a[k] + counts_b[k] for k in counts_a}
    metrics = metrics_from_counts(summed, (1.0, 0.8))
    assert metrics["acc_0"].item() == pytest.approx(1 / 4)
    assert metrics["acc_1"].item() == pytest.approx(1.0)
    assert metrics["simulated_acceptance_length"].item() == pytest.approx(0.25 + 0.25)
    zero = {key: torch.tensor(0.0, dtype=torch.float64) for key in count_keys(2)}
    assert all(v.item() == 0 for v in metrics_from_counts(zero, (1.0, 0.8)).values())


# -- determinism and bad batches --------------------------------------------------------------


def test_same_seed_same_weights_and_results_without_touching_global_rng():
    rng = torch.get_rng_state()
    a, b = objective(seed=4), objective(seed=4)
    assert torch.equal(torch.get_rng_state(), rng)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    batch = collate([sample(11, 10), sample(6, 11)], 11)
    la, ga = loss_and_grads(a, batch)
    lb, gb = loss_and_grads(b, batch)
    assert torch.equal(la, lb)
    assert all(torch.equal(ga[n], gb[n]) for n in ga)
    c = objective(seed=5)
    assert not torch.equal(c.draft.fc.weight, a.draft.fc.weight)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.pop("aux_hidden_state"), r"lacks feature\(s\) \['aux_hidden_state'\]"),
        (lambda t: t.update(hidden_state=torch.zeros(1, 6, H + 1)), r"hidden_state has shape"),
        (lambda t: t.update(loss_mask=torch.ones(1, 5, dtype=torch.int64)), r"loss_mask has shape"),
        (lambda t: t.update(input_ids=torch.full((1, 6), VOCAB)), "outside the target vocabulary"),
        (lambda t: t.update(input_ids=torch.zeros(1, 6)), "input_ids must be int64"),
    ],
)
def test_malformed_batches_are_refused_before_any_computation(mutate, message):
    obj = objective()
    batch = sample(6, 12)
    mutate(batch)
    weights = {k: v.clone() for k, v in obj.state_dict().items()}
    with pytest.raises(SchemaMismatchError, match=message):
        obj(batch)
    assert all(p.grad is None for p in obj.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in obj.state_dict().items())
