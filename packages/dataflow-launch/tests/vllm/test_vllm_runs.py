"""Runs on the vllm engine: a disaggregated online run with a managed server trains to the end;
a server SIGKILLed mid-run loses nothing and the run resumes; no vLLM process outlives its
producer (clean end or SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml
from run_helpers import cli, fresh_shm_name, read_jsonl, trained_ids
from vllm_helpers import AUX

from dataflow.contracts import PromptTask, RunFailedError
from dataflow.launch.config import load_config
from dataflow.launch.engines.vllm import VLLMTargetEngine
from dataflow.launch.producer import build_producer, open_config_ledger, open_config_store

pytestmark = pytest.mark.vllm

PROMPTS = 8


def vllm_processes(model_dir: Path) -> list[int]:
    """Pids of live processes whose command line names ``model_dir`` and vLLM."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and str(model_dir) in cmdline and "vllm" in cmdline:
            found.append(int(entry))
    return found


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def run_config(tmp_path: Path, model_dir: Path, python: str, shm: str, **target) -> dict:
    return {
        "run": {
            "id": "vllm-run",
            "out_dir": str(tmp_path / "out"),
            "topology": "disaggregated_online",
        },
        "target": {
            "engine": "vllm",
            "model_dir": str(model_dir),
            "dtype": "float32",
            "aux_layer_ids": list(AUX),
            "batch_size": 2,
            "request_timeout_s": 30.0,
            "vllm": {"python": python, "max_model_len": 512, "startup_timeout_s": 400.0},
            **target,
        },
        "data": {"max_prompts": PROMPTS, "max_length": 48},
        "store": {"uri": f"shm://{shm}"},
        "ledger": {"uri": f"sqlite://{tmp_path}/ledger.sqlite"},
        "flow": {"high_watermark": 4, "low_watermark": 2},
        "producer": {"workers": 1, "max_attempts": 5, "worker_max_failures": 2, "lease_s": 30},
        "trainer": {
            "batch_size": 2,
            "ttt_length": 2,
            "draft_vocab_size": 128,
            "warmup_steps": 1,
            "total_steps": 8,
            "checkpoint_every": 0,
            "bf16": False,
        },
    }


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_disaggregated_online_run_on_a_managed_server_trains_to_the_end(
    tmp_path, model_dir, server_python
):
    before = set(vllm_processes(model_dir))  # the module's own server, if it is up
    with fresh_shm_name() as shm:
        config = write(tmp_path, run_config(tmp_path, model_dir, server_python, shm))
        result = cli("run", config, timeout=900)
        assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
        out = tmp_path / "out"
        ids = trained_ids(out)
        assert len(ids) == len(set(ids)) == PROMPTS  # every sample trained exactly once
        status = cli("status", f"sqlite:///{tmp_path}/ledger.sqlite", "--json", timeout=60)
        assert status.returncode == 0, status.stderr
        record = json.loads(status.stdout)
        samples = record["samples"]
        assert samples["committed"] == samples["assigned"] == 0
        assert samples["trained"] + samples["released"] + samples["dropped"] == PROMPTS
        assert record["prompts"]["done"] == PROMPTS and record["prompts"]["failed"] == 0
        assert [r["step"] for r in read_jsonl(out / "trained.jsonl")] == list(range(1, 5))
    # The managed server went with its producer.
    assert wait_until(lambda: set(vllm_processes(model_dir)) <= before, 30), vllm_processes(
        model_dir
    )


KILL_PROMPTS = 40


def _tasks() -> list[PromptTask]:
    return [
        PromptTask(f"k{i}", {"input_ids": [(i * 31 + j) % 800 + 10 for j in range(20)]}, 64)
        for i in range(KILL_PROMPTS)
    ]


def _engine(server, model_dir) -> VLLMTargetEngine:
    return VLLMTargetEngine(
        server.url, str(model_dir), dtype="float32", aux_layer_ids=AUX, batch_size=2, timeout_s=30
    )


def test_a_server_sigkilled_mid_run_loses_nothing_and_the_run_resumes(
    tmp_path, model_dir, server_python, server
):
    data = run_config(tmp_path, model_dir, server_python, "x", server_url=server.url)
    data["flow"] = {"high_watermark": 64, "low_watermark": 32}
    with fresh_shm_name() as shm:
        data["store"] = {"uri": f"shm://{shm}"}
        config = load_config(write(tmp_path, data))
        ledger, store = open_config_ledger(config), open_config_store(config)
        producer = build_producer(config, _engine(server, model_dir), ledger, store)
        producer.open()
        producer.ingest(_tasks())
        errors: list[BaseException] = []

        def produce() -> None:
            try:
                producer.run()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=produce)
        thread.start()
        assert wait_until(lambda: ledger.status().in_flight >= 2, 120)
        os.killpg(server.pid, signal.SIGKILL)  # the whole server tree, mid-run
        thread.join(timeout=180)
        assert not thread.is_alive()
        # Every worker was dropped after BackendUnavailableErrors: the run failed, loudly.
        assert len(errors) == 1 and isinstance(errors[0], RunFailedError), errors
        assert "BackendUnavailableError" in producer.workers[0].report().last_error
        status = ledger.status()
        committed = sum(status.samples.values())
        assert 2 <= committed < KILL_PROMPTS
        # Nothing lost: the leased prompts went back to the ledger, none failed for good.
        assert status.prompts["failed"] == status.prompts["leased"] == 0
        assert status.prompts["done"] == committed
        assert status.prompts["pending"] == KILL_PROMPTS - committed

        # A server is back: a restarted producer on the same ledger finishes every prompt once.
        server.start()
        again = build_producer(config, _engine(server, model_dir), ledger, store)
        again.open()
        assert len(again.ingest(_tasks()).duplicates) == KILL_PROMPTS
        assert again.run().outcome in ("closed", "drained")
        final = ledger.status()
        assert final.prompts["done"] == KILL_PROMPTS and final.prompts["failed"] == 0
        assert again.workers[0].report().committed == KILL_PROMPTS - committed
        refs = ledger.refs([t.task_id for t in _tasks()])
        assert [r.sample_id for r in refs] == [t.task_id for t in _tasks()]
        for ref in refs:  # every committed feature intact
            tensors, handle = store.get(ref)
            assert tensors["input_ids"].shape == (1, 20)
            store.release(handle)
        ledger.close()
        store.gc()
        store.close()


CHILD = textwrap.dedent(
    """
    import sys, time
    from dataflow.contracts import PromptTask
    from dataflow.launch.config import TargetSection
    from dataflow.launch.engines import open_engine
    import json
    engine = open_engine(TargetSection(**json.loads(sys.argv[1])))
    sample = engine.capture([PromptTask("c", {"input_ids": [3, 4, 5]}, 16)])[0]
    print(engine.server.pid, sample.num_tokens, flush=True)
    time.sleep(600)
    """
)


def test_sigkill_of_the_producer_leaves_no_vllm_process(tmp_path, model_dir, server_python):
    target = run_config(tmp_path, model_dir, server_python, "unused")["target"]
    before = set(vllm_processes(model_dir))  # the module's own server, if it is up
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = child.stdout.readline().split()
        assert len(line) == 2 and line[1] == "3", line
        pgid = int(line[0])
        assert group_alive(pgid) and set(vllm_processes(model_dir)) - before
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert wait_until(lambda: not group_alive(pgid), 60), "vLLM outlived its producer"
        assert wait_until(lambda: set(vllm_processes(model_dir)) <= before, 30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
