"""Bad feature values never train, and a non-finite step is never applied (issue 18 item 2)."""

from __future__ import annotations

import pytest
import torch
from train_support import put_samples, sample_tensors, tiny_objective

from dataflow.contracts import SampleState
from dataflow.store import open_store
from dataflow.train.config import TrainerConfig
from dataflow.train.loader import FeatureDataLoader
from dataflow.train.nonfinite import NonFiniteStepError
from dataflow.train.optim import OptimConfig
from dataflow.train.sample_checks import BadSampleError, sample_problem, values_surely_fine
from dataflow.train.trainer import Trainer


def _bad(kind: str) -> dict[str, torch.Tensor]:
    tensors = sample_tensors(7, 6)
    if kind == "nan":
        tensors["hidden_state"][0, 2, 1] = float("nan")
    elif kind == "inf":
        tensors["aux_hidden_state"][0, 0, 0] = float("inf")
    elif kind == "mask":
        tensors["loss_mask"][0, 3] = 2
    elif kind == "long":
        tensors = sample_tensors(7, 40)
    return tensors


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("nan", "'hidden_state' has NaN or inf"),
        ("inf", "'aux_hidden_state' has NaN or inf"),
        ("mask", "loss_mask holds values other than 0 and 1"),
        ("long", "40 tokens, longer than max_length 32"),
    ],
)
def test_each_bad_value_class_is_named(kind, needle):
    assert needle in sample_problem(_bad(kind), max_length=32)
    assert sample_problem(sample_tensors(7, 6), max_length=32) is None


@pytest.mark.parametrize("kind", ["nan", "inf", "mask"])
def test_the_one_pass_batch_check_never_passes_a_bad_value(kind):
    assert values_surely_fine(sample_tensors(7, 6))
    assert not values_surely_fine(_bad(kind))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        bad = _bad(kind)
        bad["hidden_state"] = bad["hidden_state"].to(dtype)
        assert not values_surely_fine(bad)


def test_a_batch_whose_sum_overflows_is_a_false_alarm_that_trains():
    # float32 values near its max overflow their sum: the batch check cannot vouch for them,
    # the exact per-sample check finds nothing wrong, and the samples train.
    store = open_store("memory://bad-overflow", retain_on_release=True)
    big = sample_tensors(7, 6)
    big["hidden_state"] = torch.full_like(big["hidden_state"], 3e38, dtype=torch.float32)
    assert not values_surely_fine(big) and sample_problem(big, None) is None
    refs = [store.put(f"big{i}", big) for i in range(2)]
    batches = list(FeatureDataLoader(store, refs=refs, batch_size=2, shuffle=False))
    assert [b.sample_ids for b in batches] == [("big0", "big1")]


def test_a_bad_sample_inside_a_batch_is_cut_out_and_the_rest_trains():
    store = open_store("memory://bad-inside", retain_on_release=True)
    refs = put_samples(store, 3)
    refs.insert(2, store.put("poison", _bad("inf")))
    loader = FeatureDataLoader(store, refs=refs, batch_size=4, shuffle=False, max_bad_samples=1)
    (batch,) = list(loader)
    assert "poison" not in batch.sample_ids and batch.size == 3
    assert loader.bad_samples == {
        "poison": "bad_features: feature 'aux_hidden_state' has NaN or inf values"
    }
    assert store.health().active_leases == 0


def test_an_empty_sequence_is_refused():
    empty = {k: v[:, :0] for k, v in sample_tensors(7, 6).items()}
    assert sample_problem(empty, None) == "bad_features: empty sequence (no tokens)"


@pytest.mark.parametrize("kind", ["nan", "mask", "long"])
def test_the_loader_fails_naming_the_sample_and_the_store_keeps_nothing_leased(kind):
    store = open_store(f"memory://bad-{kind}", retain_on_release=True)
    refs = put_samples(store, 3)
    refs.append(store.put("poison", _bad(kind)))
    loader = FeatureDataLoader(store, refs=refs, batch_size=2, shuffle=False, max_length=32)
    with pytest.raises(BadSampleError, match="poison: bad_features"):
        list(loader)
    assert loader.bad_samples.keys() == {"poison"}
    assert store.health().active_leases == 0


def test_below_the_threshold_a_bad_sample_is_dropped_in_the_ledger_with_its_reason():
    from dataflow.control import Controller, WindowShape
    from dataflow.control.ledger import open_ledger
    from dataflow.train.ref_sources import LedgerDropSettler

    store = open_store("memory://bad-drop")
    refs = put_samples(store, 3)
    refs.insert(1, store.put("poison", _bad("nan")))
    ledger = open_ledger("memory://bad-drop")
    controller = Controller(ledger, aborter=store)
    consumer = controller.consumer(WindowShape(dp_size=1, batch_size=2), idle_timeout_s=5)
    consumer.open("bad-drop")
    producer = controller.producer()
    producer.open("bad-drop", resume=True)
    producer.commit(refs)
    producer.close()
    loader = FeatureDataLoader(
        store,
        queue=consumer.queue(),
        batch_size=2,
        max_bad_samples=1,
        settler=LedgerDropSettler(ledger, store),
    )
    trained = [sid for batch in loader for sid in batch.sample_ids]
    assert "poison" not in trained and trained[0] == "s000"
    reason = "bad_features: feature 'hidden_state' has NaN or inf values"
    assert loader.bad_samples == {"poison": reason}
    status = ledger.status()
    assert status.samples[SampleState.DROPPED.value] == 1
    assert dict(status.dropped_reasons) == {reason: 1}


def _config(**kw):
    base = dict(accumulation_steps=1, optim=OptimConfig(lr=1e-2), progress=False)
    return TrainerConfig(**{**base, **kw})


def _poisoned_trainer(name: str, **config):
    store = open_store(f"memory://{name}", retain_on_release=True)
    refs = put_samples(store, 4)
    loader = FeatureDataLoader(store, refs=refs, batch_size=2, shuffle=False)
    trainer = Trainer(tiny_objective(), loader, _config(**config))
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    with torch.no_grad():
        trainable[0].view(-1)[0] = float("nan")  # every forward now yields a NaN loss
    before = [p.detach().clone() for p in trainable]
    return trainer, trainable, before


def _unchanged(params, before) -> bool:
    """Bit-identical, NaN where it was NaN (the poisoned entry) and equal everywhere else."""
    return all(
        torch.equal(p.detach().isnan(), b.isnan())
        and torch.equal(torch.nan_to_num(p.detach()), torch.nan_to_num(b))
        for p, b in zip(params, before, strict=True)
    )


def test_a_nonfinite_step_fails_the_run_naming_the_samples_before_the_optimizer_applies_it():
    trainer, params, before = _poisoned_trainer("nf-fail")
    with pytest.raises(
        NonFiniteStepError, match=r"optimizer step 1 is non-finite \(loss nan"
    ) as err:
        trainer.fit()
    assert "s000" in str(err.value) and "s001" in str(err.value)
    assert _unchanged(params, before)
    assert trainer.step == 0


def test_on_nonfinite_skip_discards_the_window_and_goes_on():
    trainer, params, before = _poisoned_trainer("nf-skip", on_nonfinite="skip")
    result = trainer.fit()
    assert result.step == 2
    assert _unchanged(params, before)


def test_an_unknown_policy_is_refused():
    from dataflow.contracts import InvalidInputError

    with pytest.raises(InvalidInputError, match="on_nonfinite must be one of"):
        _config(on_nonfinite="ignore")
