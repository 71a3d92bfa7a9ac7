"""One consumer job across two virtual hosts under ``torchrun`` (c10d rendezvous), a host lost.

Host a runs Redis (the ledger), a Mooncake master and the storage node every feature lands in;
the producer runs on host b; ``dataflow-launch consume`` runs as one torchrun job of two ranks,
one on host c and one on host d (``--nnodes 2 --nproc-per-node 1``, the rendezvous endpoint on
c, gloo over each host's ``eth0``). Mid-run the host of rank 1 is SIGKILLed (every process on
it, as a power loss): the rank left on c fails its next collective, marks the consumer FAILED
and gives the consumer lease up; the job is then restarted with ``--resume`` on c alone.

The restart keeps the world size (two ranks, both on c): resuming a checkpoint at another
data-parallel size needs the elastic resharding of issue 17 item 1; until it lands the job
restarts on the capacity of the surviving host. The ledger then shows every committed sample
released exactly once and none dropped, and ``trained.jsonl`` lists each sample once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dataflow_testing.netns import ClusterServices, VirtualHost, VirtualHosts
from dataflow_testing.ports import free_port
from netns_support import needs_services
from test_multihost_run import CONFIG, LAUNCH, TINY, finish, ledger_samples, trained_rows

pytestmark = [needs_services, pytest.mark.redis, pytest.mark.mooncake]

PROMPTS = 8
"""Four optimizer steps of one window (two ranks x one sample)."""
RUN_ID = "mht"
SETTINGS = [
    *TINY,
    f"data.max_prompts={PROMPTS}",
    "trainer.dp_size=2",
    "trainer.batch_size=1",
    "trainer.checkpoint_every=1",
    f"flow.high_watermark={PROMPTS}",  # the producer is never held back by the consumer
    "flow.low_watermark=2",
    f"run.id={RUN_ID}",
]
RESTART_RANKS = 1
"""Ranks of the restarted job, on the surviving host: fewer than the job lost (elastic resume),
with ``RESTART_SETTINGS`` keeping the global batch (dp 1 x 2 micro-batches)."""
RESTART_SETTINGS: tuple[str, ...] = ("trainer.dp_size=1", "trainer.accumulation_steps=2")
KILL_AFTER_STEPS = 2
RUN_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def hosts() -> Any:
    """Four hosts: services on a, the producer on b, the consumer job on c and d."""
    with VirtualHosts(("a", "b", "c", "d")) as vhosts:
        yield vhosts


def sets(*items: str) -> list[str]:
    out: list[str] = []
    for item in items:
        out += ["--set", item]
    return out


def torchrun(
    host: VirtualHost, endpoint: str, nnodes: int, nproc: int, role_args: list[str], log: Path
) -> subprocess.Popen[Any]:
    """``torchrun`` on ``host``: c10d rendezvous at ``endpoint``, gloo over the host's eth0.

    The host named by ``endpoint`` serves the rendezvous store (``is_host``: torchrun's own guess
    compares the endpoint with the machine's hostname, which the virtual hosts share).
    """
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1"}
    is_host = str(endpoint.rsplit(":", 1)[0] == host.address).lower()
    argv = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={RUN_ID}",
        f"--rdzv-conf=is_host={is_host}",
        f"--local-addr={host.address}", "--max-restarts=0",
        "-m", "dataflow.launch.cli", *role_args,
    ]  # fmt: skip
    with log.open("wb") as out:
        return host.popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )


def ledger_status(host: VirtualHost, ledger: str) -> dict[str, Any]:
    """``dataflow-launch status LEDGER --json`` run on ``host``."""
    proc = host.run([LAUNCH, "status", ledger, "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    status: dict[str, Any] = json.loads(proc.stdout)
    return status


def worker_ranks(host: VirtualHost) -> set[int]:
    """Global ranks of the torchrun workers running on ``host`` (read from their environment)."""
    ranks: set[int] = set()
    for pid in host.pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if b"LOCAL_RANK" in env and b"RANK" in env:
            ranks.add(int(env[b"RANK"]))
    return ranks


def test_a_two_host_torchrun_job_survives_losing_a_host(
    hosts: VirtualHosts, cluster: ClusterServices, storage: None, tmp_path: Path
) -> None:
    b, c, d = hosts["b"], hosts["c"], hosts["d"]
    ledger = f"redis://{cluster.address}:{cluster.redis_port}/2"  # a fresh run: its own db
    producer_dir, consumer_dir = tmp_path / "producer", tmp_path / "consumer"
    producer_dir.mkdir()
    consumer_dir.mkdir()  # one run directory: the hosts share this filesystem (checkpoints)

    def role(
        name: str, host: VirtualHost, out: Path, *extra: str, more: tuple[str, ...] = ()
    ) -> list[str]:
        store = cluster.mooncake_store_uri(host.address, segment="0")
        return [name, CONFIG, *extra, "--no-progress",
                *sets(*SETTINGS, f"run.out_dir={out}", f"ledger.uri={ledger}", f"store.uri={store}",
                      *more)]  # fmt: skip

    with (tmp_path / "producer.log").open("wb") as out:
        producer = b.popen(
            [LAUNCH, *role("produce", b, producer_dir)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    endpoint = f"{c.address}:{free_port()}"
    job = {
        h.name: torchrun(h, endpoint, 2, 1, role("consume", h, consumer_dir), tmp_path / f"{h.name}.log")
        for h in (c, d)
    }  # fmt: skip
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(trained_rows(consumer_dir)) < KILL_AFTER_STEPS:
        for name, proc in job.items():
            assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the two-host job made no progress"
        time.sleep(0.02)
    ranks = {h.name: worker_ranks(h) for h in (c, d)}
    assert sorted(ranks.values()) == [{0}, {1}], ranks  # one rank on each host
    lost, kept = (c, d) if ranks["c"] == {1} else (d, c)
    killed = lost.crash()  # SIGKILL every process on the host of rank 1
    assert job[lost.name].pid in killed
    # The rank left alone fails its next collective and its torchrun ends, failed.
    survivor = job[kept.name]
    try:
        code = survivor.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"rank 0 on {kept.name} did not end after its peer host was lost")
    assert code != 0, (tmp_path / f"{kept.name}.log").read_text()[-3000:]
    state = ledger_status(hosts["a"], ledger)
    assert state["consumer"] == "failed" and state["consumer_reason"], state  # named, not silent
    killed_at = len(trained_rows(consumer_dir))
    assert killed_at < PROMPTS // 2, "the job finished before the host was lost"
    at_kill = ledger_samples(hosts["a"], ledger)
    print(
        f"lost host {lost.name} after {killed_at} steps; ledger then: {at_kill}; consumer "
        f"marked failed: {state['consumer_reason']}"
    )
    assert at_kill["released"] < PROMPTS, at_kill  # work was left for the restarted job

    # Restart on the surviving host alone, with fewer ranks (elastic resume, same global batch).
    resumed = torchrun(
        kept, f"{kept.address}:{free_port()}", 1, RESTART_RANKS,
        role("consume", kept, consumer_dir, "--resume", more=RESTART_SETTINGS),
        tmp_path / "resumed.log",
    )  # fmt: skip
    finish(resumed, tmp_path / "resumed.log", deadline + 60)
    finish(producer, tmp_path / "producer.log", deadline + 60)
    rows = trained_rows(consumer_dir)
    ids = [sid for row in rows for sid in row["sample_ids"]]
    assert [row["step"] for row in rows] == list(range(1, PROMPTS // 2 + 1)), rows
    assert len(ids) == len(set(ids)) == PROMPTS, ids  # each sample exactly once, none lost
    assert sorted(ids) == sorted(f"{RUN_ID}-p0-{i}" for i in range(PROMPTS))
    final = ledger_samples(kept, ledger)
    print(f"after the restart: {len(rows)} steps; ledger: {final}")
    assert ledger_status(kept, ledger)["consumer"] == "done"
    assert final["released"] == PROMPTS and final["dropped"] == 0, final
    assert final["committed"] == final["assigned"] == final["trained"] == 0, final
