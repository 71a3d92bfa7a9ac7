"""Exactly-once under SIGKILL: a real consumer process on a SQLite ledger file, killed at seeded
random points, restarted (sometimes with another dp_size), reconciled, run to the end.

After each run, by the ledger's record and by the consumer's own append-only log: every
committed sample was trained exactly once or dropped (``partial_window``), none lost, and every
feature file freed. 20 seeded runs by default (about a second each); ``-m slow`` adds 40 more.
"""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import pytest
from control_fixtures import make_refs
from exactly_once_audit import audit, replay
from spawned import Spawned

from dataflow.control.controller import Controller

SCRIPT = "exactly_once_consumer.py"
RUN_ID = "run-eo"
QUANTUM = 4
SAMPLES = 38  # 9 windows of 4 and a tail of 2
# dp_size x batch_size layouts of the same quantum, cycled through on restarts
LAYOUTS = ((2, 2), (4, 1), (1, 4))


def prepare(run_dir: Path, uri: str | None = None) -> tuple[str, list[str]]:
    """A ledger (SQLite file unless ``uri`` is given) holding a closed stream of SAMPLES
    committed refs, each with a feature file."""
    uri = uri or f"sqlite:///{run_dir / 'ledger.db'}"
    features = run_dir / "features"
    features.mkdir()
    controller = Controller.open(uri)
    controller.ledger.open_run(RUN_ID, QUANTUM, resume=False)
    producer = controller.producer()
    producer.open(RUN_ID, resume=True)
    refs = make_refs(0, SAMPLES)
    for ref in refs:
        (features / ref.sample_id).touch()
    producer.commit(refs)
    producer.close()
    controller.close()
    return uri, [ref.sample_id for ref in refs]


def start(uri: str, run_dir: Path, layout: tuple[int, int]) -> Spawned:
    dp, batch = layout
    return Spawned(SCRIPT, [uri, str(run_dir), RUN_ID, str(dp), str(batch)], run_dir)


def kill_after(proc: Spawned, delay: float) -> bool:
    """SIGKILL ``proc`` after ``delay`` seconds unless it finished; True if it was killed."""
    try:
        returncode = proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.kill()
        return True
    assert returncode == 0, proc.errors()
    return False


def logged_steps(run_dir: Path) -> int:
    log = run_dir / "trained.log"
    return log.read_text(encoding="utf-8").count('"step"') if log.exists() else 0


def kill_at_random_point(proc: Spawned, run_dir: Path, rng: random.Random) -> bool:
    """SIGKILL at a seeded random point: mostly after a random number of further optimizer
    steps plus a random fraction of one (mid-stream), sometimes at a random early instant
    (start-up, reconcile). True if the process was killed, False if it finished first."""
    if rng.random() < 0.25:
        return kill_after(proc, rng.uniform(0.0, 0.5))
    target = logged_steps(run_dir) + rng.randint(0, 6)
    while logged_steps(run_dir) < target:
        if proc.poll() is not None:
            assert proc.poll() == 0, proc.errors()
            return False
        time.sleep(0.002)
    return kill_after(proc, rng.uniform(0.0, 0.02))


def one_run(tmp_path: Path, seed: int, uri: str | None = None) -> int:
    """Kill the consumer 1-2 times at seeded random points, then let it finish; audit."""
    rng = random.Random(seed)
    uri, committed = prepare(tmp_path, uri)
    kills, layout_index = 0, seed % len(LAYOUTS)
    for _ in range(rng.choice((1, 2))):
        if kill_at_random_point(start(uri, tmp_path, LAYOUTS[layout_index]), tmp_path, rng):
            kills += 1
        layout_index = (layout_index + rng.choice((0, 1))) % len(LAYOUTS)  # maybe change dp
    final = start(uri, tmp_path, LAYOUTS[layout_index])
    assert final.wait(timeout=120) == 0, final.errors()
    audit(uri, tmp_path, committed, QUANTUM)
    return kills


@pytest.mark.parametrize("seed", range(20))
def test_exactly_once_under_sigkill(tmp_path, seed):
    one_run(tmp_path, seed)


def test_the_runs_really_kill_mid_stream_and_change_dp_size(tmp_path):
    """The seeded schedule kills a consumer that has trained part (not all) of the stream."""
    uri, committed = prepare(tmp_path)
    proc = start(uri, tmp_path, (2, 2))
    while not (tmp_path / "ckpt.json").exists():  # a checkpoint: mid-stream for sure
        assert proc.poll() is None, "the consumer finished before its first checkpoint"
        time.sleep(0.002)
    proc.kill()
    partial = replay(tmp_path / "trained.log")
    assert 0 < sum(len(ids) for ids in partial.values()) < len(committed)
    final = start(uri, tmp_path, (4, 1))
    assert final.wait(timeout=120) == 0, final.errors()
    status = audit(uri, tmp_path, committed, QUANTUM)
    assert status.markers.dp_size == 4


@pytest.mark.redis
@pytest.mark.parametrize("seed", range(3))
def test_exactly_once_under_sigkill_on_redis(tmp_path, seed, redis_server):
    one_run(tmp_path, seed, redis_server.url(0, namespace=f"exactly-once-{seed}"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20, 60))
def test_exactly_once_under_sigkill_long(tmp_path, seed):
    one_run(tmp_path, seed)
