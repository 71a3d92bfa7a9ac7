"""``consume`` under ``torchrun --nproc-per-node 2`` next to a ``produce`` process: the two
ranks train, ack and pass several checkpoints (each frees features and releases samples in the
shared ledger) to the end of the stream. Every committed sample is in ``trained.jsonl`` exactly
once, the ledger shows all of them released, and nothing is left in ``/dev/shm``.
"""

from __future__ import annotations

import json
import subprocess
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
    start_logged,
    torchrun_cli,
    trained_ids,
)

PROMPTS = 16  # 4 optimizer steps of 2 ranks x 2 samples
CHECKPOINT_EVERY = 2  # so the run passes checkpoints at steps 2 and 4


def test_two_rank_consumer_passes_its_checkpoints_and_trains_every_sample_once(tmp_path):
    with fresh_shm_name() as name:
        _run_two_ranks(tmp_path, name)


def _run_two_ranks(tmp_path: Path, shm_name: str) -> None:
    out = tmp_path / "run"
    overrides = sets(
        *TINY_RUN,
        "run.id=ranks",
        f"run.out_dir={out}",
        f"data.max_prompts={PROMPTS}",
        "trainer.dp_size=2",
        f"trainer.checkpoint_every={CHECKPOINT_EVERY}",
        "producer.workers=1",
        f"store.uri=shm://{shm_name}",
        f"ledger.uri=sqlite://{out}/ledger.sqlite",
    )
    config = str(EXAMPLES / "disaggregated_online.yaml")
    out.mkdir()
    producer_log, consumer_log = tmp_path / "producer.log", tmp_path / "consumer.log"
    producer = start_cli("produce", config, *overrides, log=producer_log)
    consumer = start_logged(torchrun_cli(2, "consume", config, *overrides), consumer_log)
    try:
        # A hang in a collective (the reported bug) shows as a timeout here, not a stuck suite.
        try:
            consumer_rc = consumer.wait(timeout=240)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                "the 2-rank consumer did not finish:\n" + consumer_log.read_text()[-3000:]
            ) from None
        assert consumer_rc == 0, consumer_log.read_text()[-3000:]
        assert producer.wait(timeout=60) == 0, producer_log.read_text()[-2000:]
    finally:
        for proc in (producer, consumer):
            if proc.poll() is None:
                kill_tree(proc)

    ids = trained_ids(out)
    assert len(ids) == len(set(ids)) == PROMPTS  # each committed sample exactly once
    assert sorted(ids) == sorted(f"ranks-p0-{i}" for i in range(PROMPTS))
    steps = [row["step"] for row in read_jsonl(out / "trained.jsonl")]
    assert steps == list(range(1, PROMPTS // 4 + 1))

    status = cli("status", f"sqlite:///{out}/ledger.sqlite", "--json", timeout=60)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    samples = report["samples"]
    assert samples["released"] == PROMPTS, samples  # the last step's checkpoint released all
    assert samples["committed"] == samples["assigned"] == samples["trained"] == 0, samples
    assert samples["dropped"] == 0, samples
    assert report["consumer"] == "done", report
    assert shm_segments(shm_name) == []  # both ranks freed every feature
