"""The online path with the real control plane: ledger windows → RankQueue → loader → trainer."""

import pytest
from train_support import put_samples, sample_tensors, tiny_objective

from dataflow.contracts import SchemaMismatchError
from dataflow.control import Controller, WindowShape
from dataflow.control.ledger import open_ledger
from dataflow.store import open_store
from dataflow.train.config import TrainerConfig
from dataflow.train.hooks import ControlPlaneHook
from dataflow.train.loader import FeatureDataLoader
from dataflow.train.optim import OptimConfig
from dataflow.train.ref_sources import LedgerDropSettler
from dataflow.train.trainer import Trainer

SHAPE = WindowShape(dp_size=1, batch_size=2, accumulation_steps=2)


def _online(name, make_refs, settle_in_ledger=False):
    store = open_store(f"memory://{name}", retain_on_release=True)
    controller = Controller(open_ledger(f"memory://{name}"), aborter=store)
    consumer = controller.consumer(SHAPE, idle_timeout_s=5)
    consumer.open("online")
    producer = controller.producer()
    producer.open("online", resume=True)
    producer.commit(make_refs(store))
    producer.close()
    settler = LedgerDropSettler(controller.ledger, store) if settle_in_ledger else None
    loader = FeatureDataLoader(
        store, queue=consumer.queue(), batch_size=2, prefetch=1, settler=settler
    )
    return store, controller, consumer, loader


def test_online_run_trains_every_window_once_and_frees_everything(tmp_path):
    store, controller, consumer, loader = _online(
        "online", lambda store: put_samples(store, 10, lengths=[5, 7])
    )
    config = TrainerConfig(
        run_id="online",
        accumulation_steps=2,
        total_steps=2,
        checkpoint_interval=1,
        optim=OptimConfig(lr=1e-2),
        progress=False,
    )
    hook = ControlPlaneHook(consumer)
    result = Trainer(tiny_objective(), loader, config, hooks=[hook], checkpoint_dir=tmp_path).fit()
    consumer.finish()
    status = controller.status()
    assert result.step == 2
    # 10 refs, quantum 4: two windows trained and released, the tail of 2 dropped
    assert status.samples["released"] == 8
    assert status.dropped_reasons == {"partial_window": 2}
    assert status.markers.durable_step == 2 and hook.acked_step == hook.durable_step == 2
    health = store.health()
    assert (health.resident_samples, health.active_leases) == (0, 0)


def test_online_refused_batch_frees_its_features():
    def make_refs(store):
        bad = sample_tensors(5, 6)
        bad["hidden_state"] = bad["hidden_state"].double()
        good = put_samples(store, 1, prefix="ok")
        return [*good, store.put("bad000", bad), *put_samples(store, 2, prefix="more")]

    store, controller, consumer, loader = _online("online-refused", make_refs, True)
    config = TrainerConfig(run_id="online", accumulation_steps=2, total_steps=1, progress=False)
    trainer = Trainer(tiny_objective(), loader, config, hooks=[ControlPlaneHook(consumer)])
    with pytest.raises(SchemaMismatchError, match="is float32 in 'ok000' but float64"):
        trainer.fit()
    health = store.health()
    assert health.active_leases == 0
    # the refused pair was dropped in the ledger and aborted; the window's second batch was
    # never handed over and is still resident for the controller to re-deliver after a restart
    assert health.resident_samples == 2
    status = controller.status()
    assert status.samples["dropped"] == 2 and status.samples["assigned"] == 2
    (reason,) = status.dropped_reasons
    assert reason.startswith("schema_mismatch: feature 'hidden_state' is float32")
