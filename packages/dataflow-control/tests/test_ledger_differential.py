"""The three backends agree: the same random sequence of calls gives the same results and errors.

The rules are written once, so this guards the storage layer: a backend that stored or indexed
something differently would answer differently somewhere along a long random run.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dataflow_testing.redis import RedisServer
from ledger_conformance import ManualClock, make_ref, make_task

from dataflow.contracts import DataflowError, Ledger, ProducerState
from dataflow.control.ledger import open_ledger

STEPS = 250


def _operation(
    rng: random.Random, state: dict[str, int], model: Ledger
) -> tuple[str, Callable[[Ledger], Any]]:
    """One random call (valid or not), described by name for failure messages.

    Ids are drawn from everything committed so far, or (half the time) from what ``model``
    says is assigned, so acks and drops often succeed and the run moves through every state.
    """
    n = state["next"]
    assigned = [r.sample_id for rank in (0, 1) for r in model.assigned(rank)]
    if assigned and rng.random() < 0.5:
        some = rng.sample(assigned, min(len(assigned), rng.randint(1, 4)))
    else:
        some = [f"s{rng.randrange(max(n, 1)):05d}" for _ in range(rng.randint(1, 5))]
    choice = rng.randrange(12)
    if choice < 3:
        count = rng.randint(1, 6)
        state["next"] += count
        refs = [make_ref(i) for i in range(n, n + count)]
        if n and rng.random() < 0.3:
            refs.append(make_ref(rng.randrange(n)))
        return f"commit {count}", lambda led: led.commit(refs)
    if choice < 5:
        return "assign", lambda led: led.assign_window(2, 2)
    if choice == 5:
        step = state["step"] + rng.choice([-1, 0, 1, 1])
        state["step"] = max(state["step"], step)
        return f"ack {step} {some}", lambda led: led.ack(step, some)
    if choice == 6:
        rank = rng.randrange(2)
        return f"assigned {rank}", lambda led: led.assigned(rank)
    if choice == 7:
        reason = rng.choice(["stale", "bad"])
        return f"drop {some}", lambda led: led.drop(some, reason)
    if choice == 8:
        step = rng.randrange(state["step"] + 2)
        return f"release {step}", lambda led: led.release_through(step)
    if choice == 9:
        step = rng.randrange(-1, state["step"] + 2)
        dp = rng.choice([1, 2, 4])
        return f"reconcile {step} {dp}", lambda led: led.reconcile(step, dp)
    if choice == 10:
        tasks = [make_task(rng.randrange(20)) for _ in range(3)]
        return "prompts", lambda led: (led.add_prompts(tasks), led.lease_prompts("w", 2, 5.0))
    return "tail", lambda led: led.drop_partial_tail()


def _outcome(ledger: Ledger, call: Callable[[Ledger], Any]) -> Any:
    try:
        return ("ok", call(ledger))
    except DataflowError as exc:
        return ("error", type(exc).__name__, str(exc))


@pytest.mark.redis
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_backends_agree_on_a_random_run(
    seed: int, tmp_path: Path, redis_server: RedisServer
) -> None:
    clock = ManualClock()
    uris = [
        f"memory://differential-{seed}",
        f"sqlite://{tmp_path}/diff.db",
        redis_server.url(5, namespace=f"differential-{seed}"),
    ]
    ledgers = [open_ledger(uri, clock=clock) for uri in uris]
    for ledger in ledgers:
        ledger.open_run("diff", 4, resume=False)
        ledger.set_producer_state(ProducerState.RUNNING)
    rng = random.Random(seed)
    state = {"next": 0, "step": 0}
    committed = 0
    reached: dict[str, int] = {}
    for i in range(STEPS):
        if i == STEPS - 20:
            for ledger in ledgers:
                ledger.set_producer_state(ProducerState.CLOSED)
        name, call = _operation(rng, state, ledgers[0])
        outcomes = [_outcome(ledger, call) for ledger in ledgers]
        if name.startswith("commit") and outcomes[0][0] == "ok":
            committed += len(outcomes[0][1].committed)
        for key, count in ledgers[0].status().samples.items():
            reached[key] = max(reached.get(key, 0), count)
        assert outcomes[1] == outcomes[0], f"step {i} {name}: sqlite differs from memory"
        assert outcomes[2] == outcomes[0], f"step {i} {name}: redis differs from memory"
        clock.advance(1.0)
    statuses = [ledger.status() for ledger in ledgers]
    assert [s.markers for s in statuses[1:]] == [statuses[0].markers] * 2
    assert [dict(s.samples) for s in statuses[1:]] == [dict(statuses[0].samples)] * 2
    assert [dict(s.prompts) for s in statuses[1:]] == [dict(statuses[0].prompts)] * 2
    assert statuses[1].in_flight_bytes == statuses[2].in_flight_bytes == statuses[0].in_flight_bytes
    assert sum(statuses[0].samples.values()) == committed
    # the run went through every state, so every transition was compared
    assert all(reached.get(s) for s in ("assigned", "trained", "released", "dropped")), reached
    for ledger in ledgers:
        ledger.close()
