"""Engines benchmark (issue 11 item 6, issue 15 item 7): what capturing EAGLE3 features costs on
each target engine, against the same engine's bare forward on the same prompts, in one run.

Target: the shipped trained built-in LLaMA saved as a model directory (fp32), served by a real
vLLM CPU server started by the ``vllm`` engine's own managed-server code (eager, the
``extract_hidden_states`` method and this project's connector, taking file- and store-mode
requests). Prompts:
``--prompts`` token-id prompts of ``--tokens`` tokens. Paired rounds: each round times every
path below once (odd rounds in reverse order), so every ratio is of two timings taken under the
same load; the reported ratio is the median over rounds of the per-round ratios.

Paths timed per round:

- ``vllm bare``: the same server answering each prompt with ``max_tokens=1`` and no capture (no
  ``kv_transfer_params``), ``batch_size`` requests in flight, as the engine sends them;
- ``vllm capture``: ``VLLMTargetEngine.capture`` over the prompts (the request with capture, the
  file read under its lock and removed, the final norm applied, the checked sample);
- ``vllm producer``: the rollout producer on the vllm engine (SQLite ledger, ``shm://`` store:
  lease, capture, put, commit), a fresh ledger each round and one store for all rounds (the
  previous round's samples removed, untimed, before the next: a steady-state, warm store);
- ``vllm capture (store mode)`` / ``vllm producer (store mode)``: the same with
  ``capture_mode: store`` (the connector stages the features in the producer's ``shm://``
  store, the producer checks and adopts them; no file); the capture path's staged samples are
  unstaged, untimed, before the next round;
- ``hf bare``: ``model(input_ids, attention_mask, output_hidden_states=True)`` in batches of
  ``batch_size``, in this process;
- ``hf capture``: ``HFTargetEngine.capture`` over the same prompts;
- ``hf producer``: the rollout producer on the hf engine, as above.

Every path runs in a fresh thread, as the producer's forward runs in its worker thread: torch's
OpenMP pool behaves differently in the main thread (see ``_in_fresh_thread``). ``--engines hf``
times the hf paths only (no server; the vllm rows and store_vs_file are left out).

Each path's time is measured as wall time and as CPU time (this process, plus for the vllm paths
the server's whole process group: API server, engine core, worker); the verdicts read CPU time,
which a shared machine's load disturbs far less than wall time (both are reported).

Figures (time ratios: higher is slower): capture overhead of vllm (capture / bare, target
<= 1.25), producer / bare of each engine (target <= 1.25), and the vllm capture's tokens/s over
the hf capture's (reported, no target). Store mode vs file mode per sample comes from
``bench_vllm_capture_modes.py`` (its ``measure_capture_modes``: two workloads, default and
transfer-bound, each with its own server, after this one stopped; the verdict is read on the
transfer-bound one, the default's ratio beside it) when that module exists (``store_vs_file_hook``), else it is reported as "not
measured: store mode not available".

    python bench_engines.py [--rounds 7] [--prompts 16] [--tokens 128] [--engines vllm,hf]
        [--json [PATH]]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OVERHEAD_TARGET = 1.25
"""Issue 11 item 6 and issue 15 item 7: capture / producer time <= 1.25x the bare forward."""
BATCH_SIZE = 4
STORE_MODES_MODULE = HERE / "bench_vllm_capture_modes.py"
STORE_MODES_FUNCTION = "measure_capture_modes"
NOT_MEASURED = "not measured: store mode not available"


def _tasks(count: int, tokens: int, round_no: int) -> list[Any]:
    from dataflow.contracts import PromptTask

    return [
        PromptTask(
            f"r{round_no}-p{i}",
            {"input_ids": [(i * 37 + j * 11) % 800 + 10 for j in range(tokens)]},
            tokens + 16,
        )
        for i in range(count)
    ]


def _group_cpu_s(pgid: int | None) -> float:
    """CPU seconds (user + system) of the live processes of process group ``pgid``."""
    if pgid is None:
        return 0.0
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state ppid pgrp ... utime stime
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _in_fresh_thread(run: Callable[[], Any]) -> None:
    """Run ``run`` in a new thread and wait for it, re-raising what it raised.

    Every path runs this way because the producer's forward runs in its worker thread, and
    OpenMP (torch's intra-op pool) behaves differently in the main thread than in a thread that
    starts its own team (libgomp spins less once it manages more threads than there are CPUs):
    timing the bare forward in the main thread and the producer's in a worker compared two
    thread setups, not two code paths (0.4x to 1.3x depending on the machine's load).
    """
    failure: list[BaseException] = []

    def body() -> None:
        try:
            run()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=body, name="bench-path")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def _timed(
    prepare: Callable[[list[Any]], Callable[[], Any]], tasks: list[Any], server_pgid: int | None
) -> tuple[float, float]:
    """``(wall s, CPU s)`` of one path, run in a fresh thread (:func:`_in_fresh_thread`): CPU of
    this process (every thread) plus, for a vllm path, of the server's whole process group (API
    server, engine core, worker).
    """
    run = prepare(tasks)  # untimed: what a path needs before its first token
    cpu0, server0 = time.process_time(), _group_cpu_s(server_pgid)
    started = time.perf_counter()
    _in_fresh_thread(run)
    wall = time.perf_counter() - started
    return wall, time.process_time() - cpu0 + _group_cpu_s(server_pgid) - server0


def store_vs_file_hook(server_python: str, rounds: int) -> dict[str, Any]:
    """Store mode vs file mode per sample, measured by ``bench_vllm_capture_modes.py``'s
    ``measure_capture_modes`` (its own server; ``ratio`` = file time / store time per sample,
    ``target_ratio``) when that module exists; else
    ``{"ratio": None, "note": "not measured: store mode not available"}``.
    """
    if not STORE_MODES_MODULE.is_file():
        return {"ratio": None, "note": NOT_MEASURED}
    spec = importlib.util.spec_from_file_location("bench_vllm_capture_modes", STORE_MODES_MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    measure = getattr(module, STORE_MODES_FUNCTION, None)
    if measure is None:
        return {"ratio": None, "note": f"{NOT_MEASURED} ({STORE_MODES_FUNCTION} missing)"}
    os.environ["DATAFLOW_VLLM_PYTHON"] = server_python  # the interpreter it starts vLLM with
    try:
        result: dict[str, Any] = measure(rounds=rounds)
    except Exception as exc:  # the other figures stand; this one says why it is missing
        return {"ratio": None, "note": f"not measured: {type(exc).__name__}: {exc}"[:300]}
    return result


class _Producing:
    """One engine's rollout producer over a fresh SQLite ledger per round and one ``shm://``
    store for all rounds: :meth:`prepare` (untimed) removes the previous round's samples from
    the store (what the trainer's consume does), then builds, opens and fills a new producer;
    the returned call (timed) runs it. The store stays because a running producer's store is
    warm: its arena's slabs were faulted in once and are reused, while a store created per round
    made every put pay first-touch page allocation that no steady-state put pays (the bare
    forward's allocator is warm after the warm-up, too).
    """

    def __init__(self, engine: Any, model_dir: Path, work: Path) -> None:
        self.engine, self.model_dir, self.work = engine, model_dir, work
        self._shm = f"bench-{uuid.uuid4().hex[:10]}"
        self.store_uri = f"shm://{self._shm}"
        """The producer's store: a store-mode vLLM engine stages into it."""
        self._store: Any = None
        self._produced: list[str] = []
        self._cleanup: list[Callable[[], None]] = []

    def prepare(self, tasks: list[Any]) -> Callable[[], None]:
        from dataflow.launch.config import config_from_mapping
        from dataflow.launch.producer import build_producer, open_config_ledger, open_config_store

        where = self.work / uuid.uuid4().hex[:8]
        where.mkdir()
        config = config_from_mapping(
            {
                "run": {"id": "bench", "out_dir": str(where / "out"), "seed": 0},
                "target": {
                    "engine": "hf",
                    "model_dir": str(self.model_dir),
                    "dtype": "float32",
                    "batch_size": BATCH_SIZE,
                },
                "data": {"max_length": len(tasks[0].payload["input_ids"]) + 16},
                "store": {"uri": self.store_uri, "options": {"budget_bytes": STORE_BUDGET}},
                "ledger": {"uri": f"sqlite://{where}/ledger.sqlite"},
                "flow": {"high_watermark": 4 * len(tasks), "low_watermark": len(tasks)},
                "producer": {"workers": 1},
                "trainer": {"batch_size": BATCH_SIZE, "total_steps": 1, "checkpoint_every": 0},
            }
        )
        if self._store is None:
            self._store = open_config_store(config)
        store = self._store
        while self._produced:  # the previous round's samples, consumed
            store.abort(self._produced.pop(), "bench: consumed")
        ledger = open_config_ledger(config)
        self._cleanup.append(ledger.close)
        producer = build_producer(config, self.engine, ledger, store)
        producer.open()
        producer.ingest(tasks)

        def run() -> None:
            report = producer.run()
            if report.outcome not in ("closed", "drained"):
                raise RuntimeError(f"the producer ended {report.outcome}")
            if ledger.status().prompts.get("done", 0) != len(tasks):
                raise RuntimeError(f"not every prompt was produced: {ledger.status()}")
            self._produced.extend(t.task_id for t in tasks)

        return run

    def close(self) -> None:
        """Close every round's ledger and the store; remove its shared-memory segments."""
        while self._cleanup:
            self._cleanup.pop()()
        if self._store is not None:
            self._store.close()
            self._store = None
        for segment in Path("/dev/shm").glob(f"dfs~{self._shm}~*"):
            segment.unlink(missing_ok=True)


def _bare_vllm(url: str, model: str, tasks: list[Any], pool: ThreadPoolExecutor) -> None:
    import requests

    def one(task: Any) -> None:
        body = {
            "model": model,
            "prompt": list(task.payload["input_ids"]),
            "max_tokens": 1,
            "temperature": 0.0,
            "return_token_ids": True,
        }
        answer = requests.post(f"{url}/v1/completions", json=body, timeout=120)
        answer.raise_for_status()

    list(pool.map(one, tasks))


def _served_model(url: str) -> str:
    import requests

    answer = requests.get(f"{url}/v1/models", timeout=30)
    answer.raise_for_status()
    return str(answer.json()["data"][0]["id"])


def _bare_hf(model: Any, tasks: list[Any]) -> None:
    import torch

    with torch.no_grad():
        for start in range(0, len(tasks), BATCH_SIZE):
            chunk = tasks[start : start + BATCH_SIZE]
            ids = torch.tensor([t.payload["input_ids"] for t in chunk], dtype=torch.int64)
            model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)


ENGINES = ("vllm", "hf")
STORE_BUDGET = 1 << 30


def measure(
    rounds: int, prompts: int, tokens: int, server_python: str, engines: tuple[str, ...] = ENGINES
) -> dict[str, Any]:
    """Start the server (when ``engines`` has vllm), run the paired rounds over the paths of
    ``engines``, stop it; the figures as a JSON-ready dict (rows of an engine not run: omitted).
    """
    import torch

    from dataflow.launch.builtin.save import save_builtin_target
    from dataflow.launch.config import BuiltinTargetSection, TargetSection
    from dataflow.launch.engines.hf import HFTargetEngine, load_model_dir
    from dataflow.launch.engines.vllm import VLLMTargetEngine
    from dataflow.launch.engines.vllm_server import ManagedVLLMServer

    work = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    model_dir = save_builtin_target(BuiltinTargetSection(weights="trained"), work / "target")
    target = TargetSection(
        engine="vllm",
        model_dir=str(model_dir),
        dtype="float32",
        batch_size=BATCH_SIZE,
        # capture_mode store: the server's connector also takes store-mode requests (file-mode
        # requests as before), so both modes are measured against the same server.
        vllm={
            "python": server_python,
            "max_model_len": 512,
            "startup_timeout_s": 600.0,
            "capture_mode": "store",
        },
    )
    server = ManagedVLLMServer(target) if "vllm" in engines else None
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    load = [os.getloadavg()[0]]
    startup_s: float | None = None
    closers: list[Callable[[], None]] = []
    try:
        paths: dict[str, Callable[[list[Any]], Callable[[], Any]]] = {}
        if server is not None:
            started = time.perf_counter()
            server.start()
            startup_s = time.perf_counter() - started
            vllm = VLLMTargetEngine(
                server.url, str(model_dir), dtype="float32", batch_size=BATCH_SIZE, timeout_s=120
            )
            pool = ThreadPoolExecutor(max_workers=BATCH_SIZE)
            served, url = _served_model(server.url), server.url
            vllm_producing = _Producing(vllm, model_dir, work)
            closers += [vllm_producing.close, pool.shutdown, vllm.close]
            paths["vllm bare"] = lambda ts: lambda: _bare_vllm(url, served, ts, pool)
            paths["vllm capture"] = lambda ts: lambda: vllm.capture(ts)
            paths["vllm producer"] = vllm_producing.prepare
            # Store mode (target.vllm.capture_mode: store): the connector stages into the
            # producer's shm:// store, the producer adopts. The capture path's staged samples are
            # unstaged untimed before the next round (nothing adopts them).
            store_producing = _Producing(None, model_dir, work)
            vllm_store = VLLMTargetEngine(
                server.url,
                str(model_dir),
                dtype="float32",
                batch_size=BATCH_SIZE,
                timeout_s=120,
                capture_mode="store",
                store_uri=store_producing.store_uri,
                store_options={"budget_bytes": STORE_BUDGET},
            )
            store_producing.engine = vllm_store
            staged: list[Any] = []

            def unstage() -> None:
                vllm_store._unstage(staged)
                staged.clear()

            def store_capture(ts: list[Any]) -> Callable[[], None]:
                unstage()
                return lambda: staged.extend(vllm_store.capture(ts))

            closers += [unstage, store_producing.close, vllm_store.close]
            paths["vllm capture (store mode)"] = store_capture
            paths["vllm producer (store mode)"] = store_producing.prepare
        if "hf" in engines:
            model, tokenizer = load_model_dir(str(model_dir), "float32")
            hf = HFTargetEngine(model, tokenizer, batch_size=BATCH_SIZE)
            hf_producing = _Producing(hf, model_dir, work)
            closers += [hf_producing.close, hf.close]
            paths["hf bare"] = lambda ts: lambda: _bare_hf(hf.model, ts)
            paths["hf capture"] = lambda ts: lambda: hf.capture(ts)
            paths["hf producer"] = hf_producing.prepare
        warm = _tasks(BATCH_SIZE, tokens, -1)
        for prepare in paths.values():  # warm-up: first requests, first allocations
            _in_fresh_thread(prepare(warm))
        for round_no in range(rounds):
            tasks = _tasks(prompts, tokens, round_no)
            order = list(paths.items())  # odd rounds in reverse: a load drift hits both sides
            for name, prepare in order if round_no % 2 == 0 else order[::-1]:
                pgid = server.pid if server is not None and name.startswith("vllm") else None
                wall, cpu_s = _timed(prepare, tasks, pgid)
                times.setdefault(name, []).append(wall)
                cpu.setdefault(name, []).append(cpu_s)
            load.append(os.getloadavg()[0])
        for close in closers:
            close()
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    store_vs_file = (  # after: one server at a time
        store_vs_file_hook(server_python, rounds)
        if server is not None
        else {"ratio": None, "note": "not measured: --engines without vllm"}
    )
    total_tokens = prompts * tokens

    def ratio(num: str, den: str, of: dict[str, list[float]] = cpu) -> float:
        return statistics.median(a / b for a, b in zip(of[num], of[den], strict=True))

    rows = [
        ("vllm capture / vllm bare server call (max_tokens=1, no capture)", "vllm capture",
         "vllm bare", OVERHEAD_TARGET),
        ("vllm producer / vllm bare server call", "vllm producer", "vllm bare", OVERHEAD_TARGET),
        ("vllm capture (store mode) / vllm bare server call (max_tokens=1, no capture)",
         "vllm capture (store mode)", "vllm bare", OVERHEAD_TARGET),
        ("vllm producer (store mode) / vllm bare server call", "vllm producer (store mode)",
         "vllm bare", OVERHEAD_TARGET),
        ("hf producer / bare hf forward (output_hidden_states)", "hf producer", "hf bare",
         OVERHEAD_TARGET),
        ("hf capture / bare hf forward (output_hidden_states)", "hf capture", "hf bare", None),
        ("vllm capture tokens/s / hf capture tokens/s", "hf capture", "vllm capture", None),
    ]  # fmt: skip
    return {
        "rounds": rounds,
        "prompts": prompts,
        "tokens_per_prompt": tokens,
        "batch_size": BATCH_SIZE,
        "torch_threads": torch.get_num_threads(),
        "engines": list(engines),
        "server_startup_s": None if startup_s is None else round(startup_s, 1),
        "load": {"start": load[0], "end": load[-1], "max": max(load)},
        "target_ratio": OVERHEAD_TARGET,
        "tokens_per_s": {
            name: round(total_tokens / statistics.median(ts), 1) for name, ts in times.items()
        },
        "seconds": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
        "cpu_seconds": {name: [round(t, 4) for t in ts] for name, ts in cpu.items()},
        "rows": [
            {
                "name": what,
                "ratio": round(ratio(num, den), 3),
                "wall_ratio": round(ratio(num, den, times), 3),
                "target": target_ratio,
                "met": None if target_ratio is None else ratio(num, den) <= target_ratio,
            }
            for what, num, den, target_ratio in rows
            if num in cpu and den in cpu
        ],
        "store_vs_file": store_vs_file,
    }


def main() -> None:
    """Parse the arguments, measure, print (and optionally write) the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument(
        "--vllm-python",
        default=os.environ.get("DATAFLOW_VLLM_PYTHON") or sys.executable,
        help="the interpreter that runs the vLLM server (default: $DATAFLOW_VLLM_PYTHON or this)",
    )
    parser.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help="comma-separated engines to time (default: vllm,hf); without vllm no server is "
        "started and the vllm rows and store_vs_file are not measured",
    )
    parser.add_argument("--json", nargs="?", const="-", help="JSON to stdout or to PATH")
    args = parser.parse_args()
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    if not engines or set(engines) - set(ENGINES):
        parser.error(f"--engines: choose from {', '.join(ENGINES)}, got {args.engines!r}")
    result = measure(args.rounds, args.prompts, args.tokens, args.vllm_python, engines)
    text = json.dumps(result, indent=2)
    if args.json and args.json != "-":
        Path(args.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
