"""A producer or a consumer of one shared ledger, run as its own process by the tests.

    python ledger_roles.py producer URI COUNT SEED
    python ledger_roles.py consumer URI DP_SIZE PER_RANK
    python ledger_roles.py churn URI SEED

The churner runs every sample transition in a loop until it is killed (the SIGKILL tests).

The producer commits COUNT refs in batches of random size (re-sending some, as a retrying
publisher would), then closes the run. The consumer dispatches whole windows, acks each as one
step, and at the end of stream drops the partial tail; it prints a JSON summary on stdout.
"""

from __future__ import annotations

import json
import random
import sys
import time

from ledger_conformance import make_ref

from dataflow.contracts import ConsumerState, ProducerState
from dataflow.control.ledger import open_ledger

RUN_ID = "shared-run"


def produce(uri: str, count: int, seed: int) -> None:
    rng = random.Random(seed)
    ledger = open_ledger(uri)
    ledger.open_run(RUN_ID, 0, resume=True)
    ledger.set_producer_state(ProducerState.RUNNING)
    sent = 0
    while sent < count:
        size = min(rng.randint(1, 7), count - sent)
        batch = [make_ref(i) for i in range(sent, sent + size)]
        if sent and rng.random() < 0.3:
            batch.append(make_ref(rng.randrange(sent)))  # a re-sent duplicate
        ledger.commit(batch)
        sent += size
        time.sleep(rng.uniform(0, 0.002))
    ledger.set_producer_state(ProducerState.CLOSED)
    ledger.close()


def consume(uri: str, dp_size: int, per_rank: int) -> None:
    ledger = open_ledger(uri)
    ledger.open_run(RUN_ID, dp_size * per_rank, resume=True)
    ledger.set_consumer_state(ConsumerState.RUNNING)
    trained: list[list[str]] = []
    last_window = -1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        window = ledger.assign_window(dp_size, per_rank)
        if window is None:
            if ledger.markers().producer is ProducerState.CLOSED:
                # Re-check after seeing the close: the last commits precede it.
                if ledger.assign_window(dp_size, per_rank) is None:
                    break
                continue
            time.sleep(0.001)
            continue
        step_ids = []
        for rank in range(dp_size):
            refs = ledger.assigned(rank, after_window=last_window)
            assert [r.sample_id for r in refs] == list(window.assignments[rank])
            step_ids += [r.sample_id for r in refs]
        last_window = window.window_id
        ledger.ack(len(trained), step_ids)
        trained.append(step_ids)
    tail = [ref.sample_id for ref in ledger.drop_partial_tail()]
    ledger.set_consumer_state(ConsumerState.DONE)
    ledger.close()
    print(json.dumps({"trained": trained, "tail": tail}))


def churn(uri: str, seed: int) -> None:
    rng = random.Random(seed)
    ledger = open_ledger(uri)
    ledger.open_run(RUN_ID, 4, resume=True)
    step = ledger.markers().trained_step + 1
    start = seed * 10**6  # each churner commits its own ids
    print("ready", flush=True)
    for n in range(start, start + 10**6, 6):
        ledger.commit([make_ref(i, nbytes=rng.randint(1, 999)) for i in range(n, n + 6)])
        window = ledger.assign_window(2, 2)
        if window is not None:
            ids = [sid for rank in window.assignments for sid in rank]
            if rng.random() < 0.2:
                ledger.drop(ids[:1], "stale")
                ids = ids[1:]
            ledger.ack(step, ids)
            ledger.release_through(max(step - 2, 0))
            step += 1


if __name__ == "__main__":
    role, uri = sys.argv[1], sys.argv[2]
    if role == "producer":
        produce(uri, int(sys.argv[3]), int(sys.argv[4]))
    elif role == "churn":
        churn(uri, int(sys.argv[3]))
    else:
        consume(uri, int(sys.argv[3]), int(sys.argv[4]))
