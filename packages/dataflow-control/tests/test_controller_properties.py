"""Property test: any interleaving of commits, training steps, checkpoints and crashes ends with
every committed sample trained exactly once (or dropped as the partial tail) and no feature left.

One process, a memory:// ledger; a "crash" throws the consumer away (its in-memory state is
lost) and a new one reconciles from the last durable checkpoint, like a restarted trainer.
"""

from __future__ import annotations

from control_fixtures import ResidentFeatures, make_refs, memory_uri
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflow.control.controller import Controller
from dataflow.control.window import WindowShape

OPS = st.lists(
    st.sampled_from(["commit", "commit", "step", "step", "step", "checkpoint", "crash"]),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(
    quantum_batch=st.sampled_from([1, 2, 3]),
    total=st.integers(min_value=0, max_value=20),
    ops=OPS,
    release=st.sampled_from(["on_checkpoint", "on_ack"]),
)
def test_any_interleaving_trains_each_sample_once(quantum_batch, total, ops, release):
    features = ResidentFeatures()
    controller = Controller.open(memory_uri(), aborter=features)
    shape = WindowShape(dp_size=1, batch_size=quantum_batch)
    producer = controller.producer()
    side = controller.consumer(shape, release=release)
    side.open("run-p")
    producer.open("run-p", resume=True)
    refs = make_refs(0, total)
    committed = 0
    log: dict[int, list[str]] = {}  # the trainer's log, rolled back with its checkpoint
    step, checkpoint = 0, -1

    def restart() -> None:
        nonlocal side, step, log
        side = controller.consumer(shape, release=release)
        side.open("run-p", resume=True)
        side.reconcile(checkpoint)
        log = {s: ids for s, ids in log.items() if s <= checkpoint}
        step = checkpoint + 1

    def train_one() -> bool:
        nonlocal step
        queue = side.queue()
        ids = []
        for _ in range(shape.per_rank):
            try:
                ref = queue.get(timeout=0)
            except TimeoutError:
                return False
            if ref is None:
                return False
            ids.append(ref.sample_id)
        side.ack(step, ids)
        log[step] = ids
        step += 1
        return True

    for op in ops:
        if op == "commit" and committed < total:
            batch = refs[committed : committed + 2]
            features.put(batch)
            producer.commit(batch)
            committed += len(batch)
        elif op == "step":
            train_one()
        elif op == "checkpoint" and step > 0 and step - 1 > checkpoint:
            checkpoint = step - 1
            side.checkpoint_durable(checkpoint)
        elif op == "crash":
            if release == "on_ack" and step - 1 > checkpoint:
                # on_ack freed those features: the resume is refused, so take a checkpoint
                checkpoint = step - 1
                side.checkpoint_durable(checkpoint)
            restart()
    features.put(refs[committed:])
    producer.commit(refs[committed:])
    producer.close()
    while train_one():
        pass
    assert side.queue().get(timeout=1) is None
    if step - 1 > checkpoint:
        side.checkpoint_durable(step - 1)
    trained = [sid for s in sorted(log) for sid in log[s]]
    assert len(trained) == len(set(trained))
    tail = total % quantum_batch
    assert sorted(trained) == sorted(r.sample_id for r in refs[: total - tail])
    status = controller.status()
    assert status.samples["released"] == len(trained)
    assert status.samples["dropped"] == tail
    assert status.in_flight == 0
    assert features.resident == set()
