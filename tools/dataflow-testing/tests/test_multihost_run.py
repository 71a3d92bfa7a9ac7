"""A real disaggregated online run across three virtual hosts.

Host a runs Redis (the ledger), a Mooncake master and a Mooncake storage node; the producer
(`dataflow-launch produce`) runs on host b, the consumer (`dataflow-launch consume`) on host c,
and every address used is a virtual host's. Each role has its own run directory.

Where the features live: Mooncake keeps an object in the segment of the process that mounted
it, and that memory dies with the process. The producer exits as soon as its stream is closed
(possibly before its last samples are read) and the consumer is SIGKILLed on purpose, so
neither may hold the data: both mount nothing (``segment=0``) and every put lands in the
segment of the storage node on host a (the ``storage`` fixture), which lives for the whole run.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from dataflow_testing.launch import TINY_JOB, console_script
from dataflow_testing.netns import ClusterServices, VirtualHost, VirtualHosts
from netns_support import needs_services

pytestmark = [needs_services, pytest.mark.redis, pytest.mark.mooncake]

REPO = Path(__file__).resolve().parents[3]
CONFIG = str(REPO / "examples" / "disaggregated_online.yaml")
LAUNCH = str(console_script())
PROMPTS = 16
BATCH = 2
KILL_AFTER_LINES = 2
RUN_TIMEOUT_S = 120.0

TINY = [
    *TINY_JOB,
    f"data.max_prompts={PROMPTS}",
    f"trainer.batch_size={BATCH}",
    "trainer.checkpoint_every=2",
    "flow.high_watermark=16",
    "flow.low_watermark=8",
    "producer.workers=1",
]


def overrides(run_id: str, out_dir: Path, ledger: str, store: str) -> list[str]:
    args: list[str] = []
    for item in (*TINY, f"run.id={run_id}", f"run.out_dir={out_dir}", f"ledger.uri={ledger}",
                 f"store.uri={store}"):  # fmt: skip
        args += ["--set", item]
    return args


def start(host: VirtualHost, role: str, sets: list[str], log: Path, *extra: str) -> Any:
    with log.open("wb") as out:
        return host.popen(
            [LAUNCH, role, CONFIG, *extra, *sets, "--no-progress"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def finish(proc: subprocess.Popen[Any], log: Path, deadline: float) -> None:
    """Wait for ``proc`` until ``deadline`` (monotonic); it must exit 0."""
    try:
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        pytest.fail(f"{log.name} did not finish in time:\n{log.read_text()[-3000:]}")
    assert code == 0, f"{log.name} exited {code}:\n{log.read_text()[-3000:]}"


def trained_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "trained.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ledger_samples(host: VirtualHost, ledger: str) -> dict[str, Any]:
    proc = host.run(
        [LAUNCH, "status", ledger, "--json"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    samples: dict[str, Any] = json.loads(proc.stdout)["samples"]
    return samples


def assert_every_sample_once(run_id: str, consumer_dir: Path, samples: dict[str, Any]) -> None:
    rows = trained_rows(consumer_dir)
    ids = [sid for row in rows for sid in row["sample_ids"]]
    assert len(ids) == len(set(ids)) == PROMPTS, ids  # each sample exactly once, none lost
    assert sorted(ids) == sorted(f"{run_id}-p0-{i}" for i in range(PROMPTS))
    assert [row["step"] for row in rows] == list(range(1, PROMPTS // BATCH + 1))
    assert samples["committed"] == samples["assigned"] == samples["trained"] == 0, samples
    assert samples["released"] == PROMPTS, samples
    assert samples["dropped"] == 0, samples


def test_producer_on_b_consumer_on_c_train_every_sample_once(
    hosts: VirtualHosts, cluster: ClusterServices, storage: None, tmp_path: Path
) -> None:
    b, c = hosts["b"], hosts["c"]
    ledger = f"redis://{cluster.address}:{cluster.redis_port}/0"
    producer_dir, consumer_dir = tmp_path / "producer", tmp_path / "consumer"
    producer_dir.mkdir()
    consumer_dir.mkdir()
    producer = start(
        b, "produce",
        overrides("mh", producer_dir, ledger, cluster.mooncake_store_uri(b.address, segment="0")),
        tmp_path / "producer.log",
    )  # fmt: skip
    consumer = start(
        c, "consume",
        overrides("mh", consumer_dir, ledger, cluster.mooncake_store_uri(c.address, segment="0")),
        tmp_path / "consumer.log",
    )  # fmt: skip
    deadline = time.monotonic() + RUN_TIMEOUT_S
    finish(consumer, tmp_path / "consumer.log", deadline)
    finish(producer, tmp_path / "producer.log", deadline)
    assert not (producer_dir / "trained.jsonl").exists()
    assert_every_sample_once("mh", consumer_dir, ledger_samples(c, ledger))


def test_consumer_sigkill_on_c_then_resume_trains_every_sample_once(
    hosts: VirtualHosts, cluster: ClusterServices, storage: None, tmp_path: Path
) -> None:
    b, c = hosts["b"], hosts["c"]
    ledger = f"redis://{cluster.address}:{cluster.redis_port}/1"  # a fresh run: its own db
    producer_dir, consumer_dir = tmp_path / "producer", tmp_path / "consumer"
    producer_dir.mkdir()
    consumer_dir.mkdir()
    consumer_sets = overrides(
        "mhk", consumer_dir, ledger, cluster.mooncake_store_uri(c.address, segment="0")
    )
    producer = start(
        b, "produce",
        overrides("mhk", producer_dir, ledger, cluster.mooncake_store_uri(b.address, segment="0")),
        tmp_path / "producer.log",
    )  # fmt: skip
    consumer = start(c, "consume", consumer_sets, tmp_path / "consumer.log")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(trained_rows(consumer_dir)) < KILL_AFTER_LINES:
        assert consumer.poll() is None, (tmp_path / "consumer.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the consumer on c made no progress"
        time.sleep(0.02)
    killed = c.crash()  # SIGKILL everything on host c: the consumer dies mid-run
    assert consumer.pid in killed
    consumer.wait(timeout=10)
    killed_at = len(trained_rows(consumer_dir))
    assert killed_at < PROMPTS // BATCH, "the consumer finished before it was killed"
    at_kill = ledger_samples(hosts["a"], ledger)
    print(f"killed after {killed_at} steps; ledger then: {at_kill}")
    assert at_kill["released"] < PROMPTS, at_kill  # work was left for the resumed consumer

    resumed = start(c, "consume", consumer_sets, tmp_path / "resumed.log", "--resume")
    finish(resumed, tmp_path / "resumed.log", deadline + 60)
    finish(producer, tmp_path / "producer.log", deadline + 60)
    final = ledger_samples(c, ledger)
    print(f"after resume: {len(trained_rows(consumer_dir))} steps; ledger: {final}")
    assert_every_sample_once("mhk", consumer_dir, final)
