"""Elastic resume of a real consumer: ``consume`` under ``torchrun --nproc-per-node 2`` next
to a ``produce`` process is SIGKILLed (the whole torchrun group) after its step-2 checkpoint,
then ``consume --resume`` continues on ONE rank with the same global batch (dp 2 x batch 2 x
accumulation 1 = dp 1 x batch 2 x accumulation 2): the trainer reshards the 2-rank
checkpoint, the ledger re-cuts the re-delivered windows for dp 1, and every committed sample
is in ``trained.jsonl`` exactly once, nothing left in ``/dev/shm``. ``slow`` (two consumer
starts next to a producer, about a minute or two on 2 shared cores).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from run_helpers import (
    EXAMPLES,
    TINY_RUN,
    cli,
    fresh_shm_name,
    kill_tree,
    sets,
    shm_segments,
    start_cli,
    start_logged,
    torchrun_cli,
    trained_ids,
)

PROMPTS = 32  # 8 optimizer steps of 4 samples


@pytest.mark.slow
def test_a_two_rank_consumer_resumes_on_one_rank_training_every_sample_once(tmp_path):
    with fresh_shm_name() as name:
        _run(tmp_path, name)


def _run(tmp_path: Path, shm_name: str) -> None:
    out = tmp_path / "run"
    common = sets(
        *TINY_RUN,
        "run.id=elastic",
        f"run.out_dir={out}",
        f"data.max_prompts={PROMPTS}",
        "trainer.checkpoint_every=2",
        "producer.workers=1",
        f"store.uri=shm://{shm_name}",
        f"ledger.uri=sqlite://{out}/ledger.sqlite",
    )
    two_ranks = [*common, *sets("trainer.dp_size=2")]
    one_rank = [*common, *sets("trainer.dp_size=1", "trainer.accumulation_steps=2")]
    config = str(EXAMPLES / "disaggregated_online.yaml")
    out.mkdir()
    producer_log, consumer_log = tmp_path / "producer.log", tmp_path / "consumer.log"
    producer = start_cli("produce", config, *two_ranks, log=producer_log)
    consumer = start_logged(torchrun_cli(2, "consume", config, *two_ranks), consumer_log)
    checkpoint = out / "checkpoints" / "step-00000002" / "COMPLETE"
    try:
        deadline = time.monotonic() + 240
        while not checkpoint.is_file():
            assert consumer.poll() is None, consumer_log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the 2-rank consumer made no checkpoint"
            time.sleep(0.02)
        kill_tree(consumer)
        killed_at = len(trained_ids(out))
        assert killed_at < PROMPTS, "the consumer finished before it was killed"

        resumed = cli("consume", config, *one_rank, "--resume", timeout=240)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert producer.wait(timeout=60) == 0, producer_log.read_text()[-2000:]
    finally:
        for proc in (producer, consumer):
            if proc.poll() is None:
                kill_tree(proc)

    report = json.loads((out / "trainer.json").read_text())
    # The one-rank consumer resumed from a 2-rank checkpoint and trained the rest itself.
    resumed_from = report["resumed_from_step"]
    assert resumed_from is not None and 2 <= resumed_from < PROMPTS // 4, report
    assert report["steps"] == PROMPTS // 4 and report["samples"] > 0, report
    last = out / "checkpoints" / f"step-{PROMPTS // 4:08d}" / "meta.json"
    assert json.loads(last.read_text())["ranks"]["data_parallel_size"] == 1
    ids = trained_ids(out)
    assert len(ids) == len(set(ids)) == PROMPTS  # each committed sample exactly once
    status = cli("status", f"sqlite:///{out}/ledger.sqlite", "--json", timeout=60)
    assert status.returncode == 0, status.stderr
    samples = json.loads(status.stdout)["samples"]
    assert samples["released"] == PROMPTS, samples
    assert samples["committed"] == samples["assigned"] == samples["trained"] == 0, samples
    assert shm_segments(shm_name) == []
