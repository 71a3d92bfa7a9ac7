"""``consume --resume`` after a SIGKILL of the consumer: the run continues to the end and every
sample is in ``trained.jsonl`` exactly once; the ledger shows every sample trained or dropped.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from run_helpers import (
    EXAMPLES,
    TINY_RUN,
    cli,
    fresh_shm_name,
    kill_tree,
    read_jsonl,
    sets,
    shm_segments,
    start_cli,
    trained_ids,
)

PROMPTS = 24
KILL_AFTER_LINES = 3


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_consume_resume_after_sigkill_trains_every_sample_exactly_once(tmp_path):
    with fresh_shm_name() as name:
        _kill_and_resume(tmp_path, name)


def _kill_and_resume(tmp_path: Path, shm_name: str) -> None:
    out = tmp_path / "run"
    overrides = sets(
        *TINY_RUN,
        "run.id=resume",
        f"run.out_dir={out}",
        f"data.max_prompts={PROMPTS}",
        "data.max_length=64",
        "trainer.ttt_length=4",
        "trainer.checkpoint_every=3",
        "producer.workers=1",
        f"store.uri=shm://{shm_name}",
        f"ledger.uri=sqlite://{out}/ledger.sqlite",
    )
    config = str(EXAMPLES / "disaggregated_online.yaml")
    out.mkdir()
    producer = start_cli("produce", config, *overrides, log=tmp_path / "producer.log")
    consumer = start_cli("consume", config, *overrides, log=tmp_path / "consumer.log")
    try:
        deadline = time.monotonic() + 120
        while _lines(out / "trained.jsonl") < KILL_AFTER_LINES:
            assert consumer.poll() is None, (tmp_path / "consumer.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the consumer made no progress"
            time.sleep(0.02)
        os.kill(consumer.pid, signal.SIGKILL)
        consumer.wait()
        killed_at = _lines(out / "trained.jsonl")
        assert killed_at < PROMPTS // 2, "the consumer finished before it was killed"

        resumed = cli("consume", config, *overrides, "--resume", timeout=180)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert producer.wait(timeout=60) == 0, (tmp_path / "producer.log").read_text()[-2000:]
    finally:
        for proc in (producer, consumer):
            if proc.poll() is None:
                kill_tree(proc)

    ids = trained_ids(out)
    assert len(ids) == len(set(ids)) == PROMPTS  # each sample exactly once, none lost
    assert sorted(ids) == sorted(f"resume-p0-{i}" for i in range(PROMPTS))
    steps = [row["step"] for row in read_jsonl(out / "trained.jsonl")]
    assert steps == list(range(1, PROMPTS // 2 + 1))

    status = cli("status", f"sqlite:///{out}/ledger.sqlite", "--json", timeout=60)
    assert status.returncode == 0, status.stderr
    samples = json.loads(status.stdout)["samples"]
    assert samples["committed"] == samples["assigned"] == 0
    assert samples["trained"] + samples["released"] + samples["dropped"] == PROMPTS
    assert shm_segments(shm_name) == []  # every feature freed, the killed run's included
