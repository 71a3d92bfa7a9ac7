import math

import pytest
import torch
from safetensors.torch import load_file
from train_support import ListQueue, put_samples, tiny_objective

from dataflow.contracts import CorruptRecordError, InvalidInputError, NotFoundError, RunFailedError
from dataflow.control.ledger import open_ledger
from dataflow.store import open_store
from dataflow.train.config import TrainerConfig
from dataflow.train.distributed import LocalCollective
from dataflow.train.eagle3 import metrics_from_counts
from dataflow.train.hooks import AckHook, LedgerAck, StepEvent, TrainerHook, WeightPublishHook
from dataflow.train.loader import FeatureDataLoader
from dataflow.train.metrics import JsonlMetrics, read_jsonl
from dataflow.train.optim import OptimConfig
from dataflow.train.parallel.backend import LocalBackend
from dataflow.train.trainer import Trainer


class Recorder(TrainerHook):
    def __init__(self):
        self.events: list[StepEvent] = []

    def on_optimizer_step(self, event):
        self.events.append(event)


def _setup(name, count=8, batch_size=2, **loader_kw):
    store = open_store(f"memory://{name}", retain_on_release=True)
    refs = put_samples(store, count, lengths=[5, 8])
    loader = FeatureDataLoader(store, refs=refs, batch_size=batch_size, seed=1, **loader_kw)
    return store, refs, loader


def _config(**kw):
    base = dict(accumulation_steps=2, optim=OptimConfig(lr=1e-2), progress=False)
    return TrainerConfig(**{**base, **kw})


def test_each_boundary_acks_the_window_through_the_ledger(tmp_path):
    store, refs, loader = _setup("ack")
    ledger = open_ledger("memory://ack")
    ledger.open_run("run", 4, resume=False)
    ledger.commit(refs)
    while ledger.assign_window(1, 4) is not None:
        pass
    recorder = Recorder()
    ack = AckHook(LedgerAck(LocalCollective(), ledger))
    metrics = JsonlMetrics(tmp_path / "m.jsonl")
    result = Trainer(
        tiny_objective(), loader, _config(), hooks=[ack, recorder], metrics=metrics
    ).fit()
    assert result.step == 2 and sorted(result.losses) == [1, 2]
    windows = [e.sample_ids for e in recorder.events]
    assert [e.step for e in recorder.events] == [1, 2]
    assert [len(w) for w in windows] == [4, 4]
    assert sorted(windows[0] + windows[1]) == [r.sample_id for r in refs]
    status = ledger.status()
    assert status.samples["trained"] == 8 and status.markers.trained_step == 2
    assert ack.acked_step == 2
    rows = read_jsonl(tmp_path / "m.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == result.losses[1]
    assert {"lr", "grad_norm", "step_time_s", "data_wait_s", "train/acc"} <= rows[0].keys()
    assert store.health().active_leases == 0


def test_publish_hook_registers_a_weight_version_with_the_trainable_weights(tmp_path):
    _, _, loader = _setup("publish")
    ledger = open_ledger("memory://publish")
    ledger.open_run("run", 4, resume=False)
    hook = WeightPublishHook(ledger, tmp_path / "weights", interval=2)
    trainer = Trainer(tiny_objective(), loader, _config(run_id="pub"), hooks=[hook])
    trainer.fit()
    (version,) = ledger.weight_versions()
    assert (version.version_id, version.step, version.publish_order) == ("pub-step2", 2, 1)
    saved = load_file(f"{version.location}/model.safetensors")
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert saved.keys() == trainable.keys()
    assert all(torch.equal(saved[n], trainable[n].detach()) for n in saved)
    assert not any(n.startswith("target_") for n in saved)


def test_bf16_autocast_keeps_fp32_master_weights():
    _, _, loader32 = _setup("fp32")
    _, _, loader16 = _setup("bf16")
    fp32 = Trainer(tiny_objective(), loader32, _config()).fit().losses
    trainer = Trainer(tiny_objective(), loader16, _config(), backend=LocalBackend("bf16"))
    bf16 = trainer.fit().losses
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(math.isfinite(v) for v in bf16.values())
    assert bf16 != fp32  # compute really ran in bf16
    assert bf16[1] == pytest.approx(fp32[1], rel=5e-2)


def test_accumulation_steps_must_divide_the_planned_batches():
    _, _, loader = _setup("plan", count=6)  # 3 batches of 2
    with pytest.raises(InvalidInputError, match="not a multiple of accumulation_steps=2"):
        Trainer(tiny_objective(), loader, _config())
    assert Trainer(tiny_objective(), loader, _config(max_steps=1)).fit().step == 1


def test_a_stream_that_ends_mid_window_fails_instead_of_stepping():
    store = open_store("memory://midwindow")
    refs = put_samples(store, 6)
    loader = FeatureDataLoader(store, queue=ListQueue(refs), batch_size=2)
    trainer = Trainer(tiny_objective(), loader, _config(total_steps=2))
    with pytest.raises(RunFailedError, match="1 micro-batches into an optimizer window of 2"):
        trainer.fit()
    assert trainer.step == 1
    assert trainer.unyielded_refs == []  # the stream was drained: nothing left unaccounted


def test_queue_mode_trains_through_the_same_loop():
    store = open_store("memory://queue-train")
    refs = put_samples(store, 8)
    loader = FeatureDataLoader(store, queue=ListQueue(refs), batch_size=2, prefetch=1)
    result = Trainer(tiny_objective(), loader, _config(total_steps=2)).fit()
    assert result.step == 2
    assert store.health().resident_samples == 0  # consume-once: all freed after training


def test_a_failing_loader_surfaces_its_own_error_and_hands_back_its_refs():
    store, refs, loader = _setup("broken", shuffle=False)
    store.abort(refs[0].sample_id, "gone")
    trainer = Trainer(tiny_objective(), loader, _config())
    with pytest.raises(NotFoundError):
        trainer.fit()
    assert store.health().active_leases == 0
    assert [r.sample_id for r in trainer.unyielded_refs] == ["s000", "s001"]


def test_resume_refuses_a_checkpoint_from_another_config_and_changes_nothing(tmp_path):
    _, _, loader = _setup("cfg-a")
    Trainer(tiny_objective(), loader, _config(max_steps=1), checkpoint_dir=tmp_path).fit()
    _, _, loader = _setup("cfg-b")
    other = _config(max_steps=2, optim=OptimConfig(lr=2e-2), accumulation_steps=1)
    trainer = Trainer(tiny_objective(), loader, other, checkpoint_dir=tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(InvalidInputError) as info:
        trainer.fit(resume=True)
    message = str(info.value)
    assert "trainer.optim.lr: saved 0.01, now 0.02" in message
    assert "trainer.accumulation_steps: saved 2, now 1" in message
    assert "max_steps" not in message  # a run-only field may change
    assert trainer.step == 0
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_a_failed_save_keeps_the_previous_checkpoint_and_fails_the_run(tmp_path):
    def fault(phase, step):
        if phase == "before_rename" and step == 2:
            raise OSError("disk full")

    _, _, loader = _setup("faulty", count=12)
    config = _config(checkpoint_interval=1, max_steps=3, total_steps=3)
    trainer = Trainer(
        tiny_objective(), loader, config, checkpoint_dir=tmp_path, checkpoint_fault_hook=fault
    )
    with pytest.raises(CorruptRecordError, match="step 2 was not published: OSError: disk full"):
        trainer.fit()
    assert [c.step for c in trainer.checkpoints.complete()] == [1]
    _, _, loader = _setup("faulty-resume", count=12)
    resumed = Trainer(tiny_objective(), loader, config, checkpoint_dir=tmp_path)
    assert sorted(resumed.fit(resume=True).losses) == [2, 3]
    assert [c.step for c in resumed.checkpoints.complete()] == [1, 2, 3]
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    with pytest.raises(NotFoundError, match="not a complete checkpoint"):
        resumed.checkpoints.resolve(tmp_path / "step-00000009")


def test_trainer_config_refuses_bad_values():
    with pytest.raises(InvalidInputError, match="accumulation_steps must be an int >= 1"):
        TrainerConfig(accumulation_steps=0)
    with pytest.raises(InvalidInputError, match="run id"):
        TrainerConfig(run_id="../x")


def test_ratio_metrics_from_counts_are_exact_over_the_window(tmp_path):
    store, refs, _ = _setup("counts")  # lengths alternate 5, 8
    refs = [refs[0], refs[2], refs[1], refs[3], *refs[4:]]  # micro-batches of 10 and 16 tokens
    loader = FeatureDataLoader(store, refs=refs, batch_size=2, shuffle=False)
    step_weights = tiny_objective().config.step_weights
    trainer = Trainer(
        tiny_objective(),
        loader,
        _config(max_steps=1),
        metrics=JsonlMetrics(tmp_path / "m.jsonl"),
        metrics_from_counts=lambda c: metrics_from_counts(c, step_weights),
    )
    trainer.fit()
    (row,) = read_jsonl(tmp_path / "m.jsonl")

    # the same two micro-batches through an untouched copy of the objective
    reference = tiny_objective()
    batches = list(FeatureDataLoader(store, refs=refs[:4], batch_size=2, shuffle=False))
    outputs = [reference(b.tensors) for b in batches]
    summed = {k: sum(o.counts[k] for o in outputs) for k in outputs[0].counts}
    expected = metrics_from_counts(summed, step_weights)
    for name in ("acc_0", "acceptance_rate_1", "simulated_acceptance_length", "loss"):
        assert row[f"train/{name}"] == pytest.approx(float(expected[name]), rel=1e-9)
    # token-weighted window loss vs the mean of per-micro-batch losses: different on purpose
    tokens = [float(o.counts["tokens"]) for o in outputs]
    assert tokens[0] != tokens[1]
