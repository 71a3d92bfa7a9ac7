"""vLLM capture modes per sample: ``store`` (the connector writes the features in place into
the run's ``shm://`` store, the producer adopts them) vs ``file`` (the stock connector file,
read and removed by the producer, which then puts the features into the same store), in the
same run, on two workloads (one managed vLLM server each, eager, CPU build, fp32):

- ``default``: the tiny LLaMA of earlier runs (``--hidden`` 512, 4 layers, heads of 64) and
  ``--tokens`` 256-token prompts: ~2 MB of features per sample, so the server's per-request
  cost dominates (reported, not the verdict's workload);
- ``transfer-bound`` (the verdict's workload): what the modes are for on a GPU, where an 8B
  target's forward over 2048 tokens takes ~50 ms and its features are ~67 MB. Emulated on CPU
  by a LLaMA whose residual stream is wide (``--wide-hidden`` 2048) but whose compute is small
  (1 head of 64, MLP width 16, 4 layers, the shipped 1k vocabulary), over ``--wide-tokens``
  2048-token prompts: 64 MiB of fp32 features per sample. Its forward is still ~10 GFLOP
  (the projections in and out of the wide stream), on one torch thread of a CPU vLLM server:
  hundreds of ms, not 50, so this workload still understates the transfer's share.

Per workload, ``--prompts`` prompts are captured in ``--rounds`` interleaved rounds (bare,
file, store, then the reverse order: the load drifts alike for all). Per sample, each mode's
time is everything the producer waits for until the sample is in the store: the
``/v1/completions`` request, then file mode's wait-for-lock + read + remove + put, or store
mode's wait for the staged sample + token check + adopt; ``bare`` is the same request without
capture (the server's own cost, forward included). Reported per workload: the median seconds
per sample of each mode and their ratio (file / store; target >= 1.5), the producer's CPU time
per sample, the split of each mode (capture call vs put/adopt), the connector's own seconds per
save (``DATAFLOW_CONNECTOR_TIMINGS``: in the engine step, on its write thread), bytes per
sample and the load average.

    python tools/bench/bench_vllm_capture_modes.py [--rounds 5] [--prompts 8] [--tokens 256]
        [--workloads default,transfer-bound]

The server's Python is ``DATAFLOW_VLLM_PYTHON`` (a venv with vLLM), else this interpreter.
:func:`measure_capture_modes` is what ``bench-engines`` calls.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

TARGET_RATIO = 1.5
AUX = (0, 1, 2)


def _tiny_llama(path: Path, hidden: int) -> Path:
    import torch

    from dataflow.launch.builtin.target import build_builtin_target
    from dataflow.launch.config import BuiltinTargetSection

    section = BuiltinTargetSection(
        hidden_size=hidden,
        num_layers=4,
        num_heads=max(hidden // 64, 1),
        num_kv_heads=max(hidden // 64, 1),
        intermediate_size=2 * hidden,
        seed=0,
    )
    model, tokenizer = build_builtin_target(section, torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _tasks(prompts: int, tokens: int, tag: str) -> list[Any]:
    from dataflow.contracts import PromptTask

    return [
        PromptTask(
            f"{tag}-{i}",
            {"input_ids": [(i * 37 + j * 11) % 800 + 10 for j in range(tokens)]},
            tokens + 8,
        )
        for i in range(prompts)
    ]


def _wide_llama(path: Path, hidden: int) -> Path:
    """A LLaMA with a wide residual stream and little compute (module docstring)."""
    import torch
    import transformers

    from dataflow.launch.builtin.tokenizer import load_builtin_tokenizer

    tokenizer = load_builtin_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=16,
        num_hidden_layers=4,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=8192,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


WORKLOADS = ("default", "transfer-bound")
VERDICT_WORKLOAD = "transfer-bound"


def _bare_round(engine: Any, store: Any, tasks: list[Any]) -> tuple[float, float, float]:
    import requests

    url, model = engine._url, engine._served_model  # the engine's own server and model name
    start, cpu = time.perf_counter(), time.process_time()
    for task in tasks:
        body = {"model": model, "prompt": list(task.payload["input_ids"]), "max_tokens": 1}
        requests.post(f"{url}/v1/completions", json=body, timeout=600).raise_for_status()
    elapsed, spent = time.perf_counter() - start, time.process_time() - cpu
    return elapsed / len(tasks), spent / len(tasks), 0.0


def _file_round(engine: Any, store: Any, tasks: list[Any]) -> tuple[float, float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    samples = engine.capture(tasks)
    captured = time.perf_counter()
    refs = [store.put(s.task_id, dict(s.tensors), {"num_tokens": s.num_tokens}) for s in samples]
    end = time.perf_counter()
    elapsed, spent = end - start, time.process_time() - cpu
    for ref in refs:
        store.abort(ref.sample_id, "bench done")
    return elapsed / len(tasks), spent / len(tasks), (end - captured) / len(tasks)


def _store_round(engine: Any, store: Any, tasks: list[Any]) -> tuple[float, float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    samples = engine.capture(tasks)
    captured = time.perf_counter()
    refs = [
        store.adopt(s.task_id, s.written.generation, s.written.specs, {"num_tokens": s.num_tokens})
        for s in samples
    ]
    end = time.perf_counter()
    elapsed, spent = end - start, time.process_time() - cpu
    for ref in refs:
        store.abort(ref.sample_id, "bench done")
    return elapsed / len(tasks), spent / len(tasks), (end - captured) / len(tasks)


ROUNDS = {"bare": _bare_round, "file": _file_round, "store": _store_round}


def _connector_timings(path: Path) -> dict[str, dict[str, float]]:
    """Median seconds per save of each mode, in the engine step and on the write thread."""
    seen: dict[str, list[dict[str, Any]]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                seen.setdefault(record["mode"], []).append(record)
    return {
        mode: {
            "step_s": statistics.median(r["step_s"] for r in records),
            "write_s": statistics.median(r["write_s"] for r in records),
            "bytes": statistics.median(r["bytes"] for r in records),
            "saves": len(records),
        }
        for mode, records in seen.items()
    }


SERVER_METRICS = (
    "vllm:request_prefill_time_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:e2e_request_latency_seconds",
)


def _server_metrics(url: str) -> dict[str, float]:
    """``<name>_sum`` and ``<name>_count`` of the server's own timing histograms."""
    import requests

    out: dict[str, float] = {}
    for line in requests.get(f"{url}/metrics", timeout=30).text.splitlines():
        for name in SERVER_METRICS:
            for part in ("_sum", "_count"):
                if line.startswith(f"{name}{part}"):
                    out[name + part] = out.get(name + part, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _server_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean seconds per request of each server histogram between two snapshots."""
    means = {}
    for name in SERVER_METRICS:
        count = after.get(name + "_count", 0.0) - before.get(name + "_count", 0.0)
        if count > 0:
            total = after.get(name + "_sum", 0.0) - before.get(name + "_sum", 0.0)
            means[name.removeprefix("vllm:").removesuffix("_seconds") + "_s"] = total / count
    return means


def measure_workload(
    workload: str,
    rounds: int = 5,
    prompts: int = 8,
    tokens: int = 256,
    hidden: int = 512,
    batch_size: int = 1,
) -> dict[str, Any]:
    """One workload's row: seconds per sample of bare, file and store against one real vLLM
    server, interleaved in the same run, and file / store. Starts and stops its own server;
    leaves nothing in ``/dev/shm`` or on disk.
    """
    from dataflow.launch.config import TargetSection
    from dataflow.launch.engines.vllm import VLLMTargetEngine
    from dataflow.launch.engines.vllm_server import ManagedVLLMServer
    from dataflow.launch.engines.vllm_wire import TIMINGS_ENV
    from dataflow.store import open_store

    python = os.environ.get("DATAFLOW_VLLM_PYTHON") or sys.executable
    shm = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        build = _tiny_llama if workload == "default" else _wide_llama
        model_dir = build(Path(tmp) / "model", hidden)
        feature_bytes = tokens * 4 * hidden * 4 + 2 * tokens * 8  # fp32 streams + ids + mask
        target = TargetSection(
            engine="vllm",
            model_dir=str(model_dir),
            dtype="float32",
            aux_layer_ids=AUX,
            batch_size=batch_size,
            vllm={
                "python": python,
                "max_model_len": tokens + 64,
                "startup_timeout_s": 600.0,
                "kv_cache_gib": max(1.0, 4 * feature_bytes * batch_size / 2**30),
            },
        )
        timings = Path(tmp) / "connector-timings.jsonl"
        server = ManagedVLLMServer(target)
        previous = os.environ.get(TIMINGS_ENV)
        os.environ[TIMINGS_ENV] = str(timings)  # the server inherits it
        try:
            server.start()
        finally:
            if previous is None:
                os.environ.pop(TIMINGS_ENV, None)
            else:
                os.environ[TIMINGS_ENV] = previous
        # As a run's store: a byte budget, so the shm:// arena is on (file mode's puts use it).
        budget = max(1 << 30, 2 * prompts * feature_bytes)
        store = open_store(f"shm://{shm}", budget_bytes=budget)
        common = {"dtype": "float32", "aux_layer_ids": AUX, "batch_size": batch_size}
        engines = {
            "file": VLLMTargetEngine(server.url, str(model_dir), **common),
            "store": VLLMTargetEngine(
                server.url,
                str(model_dir),
                capture_mode="store",
                store_uri=store.uri,
                **common,
            ),
        }
        engines["bare"] = engines["file"]
        wall: dict[str, list[float]] = {m: [] for m in ROUNDS}
        cpu: dict[str, list[float]] = {m: [] for m in ROUNDS}
        finish: dict[str, list[float]] = {m: [] for m in ROUNDS}
        try:
            for mode, run in ROUNDS.items():  # warm-up
                run(engines[mode], store, _tasks(2, tokens, f"warm-{mode}"))
            timings.unlink(missing_ok=True)
            before = _server_metrics(server.url)
            for r in range(rounds):
                order = list(ROUNDS) if r % 2 == 0 else list(reversed(ROUNDS))
                for mode in order:
                    tasks = _tasks(prompts, tokens, f"{mode}-{r}")
                    w, c, f = ROUNDS[mode](engines[mode], store, tasks)
                    wall[mode].append(w)
                    cpu[mode].append(c)
                    finish[mode].append(f)
            server_means = _server_means(before, _server_metrics(server.url))
        finally:
            for name in ("file", "store"):
                engines[name].close()
            store.gc()
            store.close()
            server.stop()
        connector = _connector_timings(timings)
    med = {m: statistics.median(v) for m, v in wall.items()}
    med_cpu = {m: statistics.median(v) for m, v in cpu.items()}
    return {
        "workload": workload,
        "file_s_per_sample": med["file"],
        "store_s_per_sample": med["store"],
        "bare_s_per_sample": med["bare"],
        "ratio": med["file"] / med["store"],
        "file_cpu_s_per_sample": med_cpu["file"],
        "store_cpu_s_per_sample": med_cpu["store"],
        "cpu_ratio": med_cpu["file"] / med_cpu["store"],
        "file_put_s_per_sample": statistics.median(finish["file"]),
        "store_adopt_s_per_sample": statistics.median(finish["store"]),
        "connector": connector,
        "server": server_means,
        "bytes_per_sample": feature_bytes,
        "target_ratio": TARGET_RATIO,
        "rounds": wall,
        "cpu_rounds": cpu,
        "prompts": prompts,
        "tokens": tokens,
        "hidden": hidden,
        "load_avg": os.getloadavg(),
    }


def measure_capture_modes(
    rounds: int = 5,
    prompts: int = 8,
    tokens: int = 256,
    hidden: int = 512,
    batch_size: int = 1,
    wide_tokens: int = 2048,
    wide_hidden: int = 2048,
    workloads: tuple[str, ...] = WORKLOADS,
) -> dict[str, Any]:
    """Both workloads' rows (``workloads``), each from its own server, one after the other.
    The top-level ``ratio`` is the verdict's: the transfer-bound workload's (see the module
    docstring), with ``verdict_workload`` naming it and ``default_ratio`` the default's beside
    it; each row is under ``workloads``.
    """
    rows = {}
    for workload in workloads:
        if workload not in WORKLOADS:
            raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
        wide = workload == "transfer-bound"
        rows[workload] = measure_workload(
            workload,
            rounds,
            prompts,
            wide_tokens if wide else tokens,
            wide_hidden if wide else hidden,
            batch_size,
        )
    verdict = VERDICT_WORKLOAD if VERDICT_WORKLOAD in rows else next(iter(rows))
    main = rows[verdict]
    return {
        **{k: v for k, v in main.items() if k != "workload"},
        "verdict_workload": verdict,
        "default_ratio": rows["default"]["ratio"] if "default" in rows else None,
        "workloads": rows,
    }


def describe_row(row: dict[str, Any]) -> str:
    """One workload's figures on one line."""
    load = ", ".join(f"{x:.2f}" for x in row["load_avg"])
    conn = row.get("connector") or {}
    saves = "; ".join(
        f"connector {m} save {c['step_s'] * 1e3:.1f} ms in step + {c['write_s'] * 1e3:.1f} ms "
        "on its thread"
        for m, c in sorted(conn.items())
    )
    server = row.get("server") or {}
    saves += "; server per request (all modes): " + ", ".join(
        f"{k.removesuffix('_s')} {v * 1e3:.1f} ms" for k, v in sorted(server.items())
    )
    return (
        f"{row['workload']} ({row['tokens']} tokens, H={row['hidden']}, "
        f"{row['bytes_per_sample'] / 2**20:.1f} MiB/sample): bare {row['bare_s_per_sample'] * 1e3:.1f}"
        f" ms, file {row['file_s_per_sample'] * 1e3:.1f} ms (put {row['file_put_s_per_sample'] * 1e3:.1f}"
        f" ms), store {row['store_s_per_sample'] * 1e3:.1f} ms (adopt "
        f"{row['store_adopt_s_per_sample'] * 1e3:.2f} ms); file/store = {row['ratio']:.2f}x; "
        f"producer CPU per sample: file {row['file_cpu_s_per_sample'] * 1e3:.1f} ms, store "
        f"{row['store_cpu_s_per_sample'] * 1e3:.1f} ms = {row['cpu_ratio']:.2f}x; {saves}; "
        f"load average {load}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print the same-run ratio (``--json`` for the full record)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--wide-tokens", type=int, default=2048)
    parser.add_argument("--wide-hidden", type=int, default=2048)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure_capture_modes(
        args.rounds,
        args.prompts,
        args.tokens,
        args.hidden,
        wide_tokens=args.wide_tokens,
        wide_hidden=args.wide_hidden,
        workloads=tuple(w for w in args.workloads.split(",") if w),
    )
    if args.json:
        print(json.dumps(result, indent=2))
    for row in result["workloads"].values():
        print(f"vllm capture per sample, {describe_row(row)}")
    verdict = "meets" if result["ratio"] >= TARGET_RATIO else "misses"
    default = result["default_ratio"]
    print(
        f"verdict (read on the {result['verdict_workload']} workload): file/store = "
        f"{result['ratio']:.2f}x, {verdict} the >= {TARGET_RATIO}x target"
        + ("" if default is None else f"; the default workload's file/store = {default:.2f}x")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
