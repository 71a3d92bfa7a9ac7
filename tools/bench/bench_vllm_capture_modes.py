"""vLLM capture modes per sample: ``store`` (the connector stages features into the run's
``shm://`` store, the producer adopts them) vs ``file`` (the stock connector file, read and
removed by the producer, which then puts the features into the same store), in the same run.

Workload: a tiny LLaMA saved to disk (fp32, ``--hidden`` wide, 4 layers, the vllm tests' shape
by default but wider so the features are not negligible), one managed vLLM server (eager, CPU
build) that takes both modes, ``--prompts`` prompts of ``--tokens`` tokens captured in
``--rounds`` interleaved rounds (file, store, file, store...: the load drifts alike for both).
Per sample, each mode's time is everything the producer waits for until the sample is in the
store: the ``/v1/completions`` request, then file mode's wait-for-lock + read + remove + put,
or store mode's wait for the staged sample + token check + adopt. Reported: the median seconds
per sample of each mode over the rounds and their ratio (file / store; target >= 1.5), the
same for the producer process's CPU time per sample (what the producer itself spends: the
server's forward is outside it), with the load average.

    python tools/bench/bench_vllm_capture_modes.py [--rounds 5] [--prompts 8] [--tokens 256]

The server's Python is ``DATAFLOW_VLLM_PYTHON`` (a venv with vLLM), else this interpreter.
:func:`measure_capture_modes` is what ``bench-engines`` calls.
"""

from __future__ import annotations

import argparse
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


def _file_round(engine: Any, store: Any, tasks: list[Any]) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    samples = engine.capture(tasks)
    refs = [store.put(s.task_id, dict(s.tensors), {"num_tokens": s.num_tokens}) for s in samples]
    elapsed, spent = time.perf_counter() - start, time.process_time() - cpu
    for ref in refs:
        store.abort(ref.sample_id, "bench done")
    return elapsed / len(tasks), spent / len(tasks)


def _store_round(engine: Any, store: Any, tasks: list[Any]) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    samples = engine.capture(tasks)
    refs = [
        store.adopt(s.task_id, s.written.generation, s.written.specs, {"num_tokens": s.num_tokens})
        for s in samples
    ]
    elapsed, spent = time.perf_counter() - start, time.process_time() - cpu
    for ref in refs:
        store.abort(ref.sample_id, "bench done")
    return elapsed / len(tasks), spent / len(tasks)


def measure_capture_modes(
    rounds: int = 5, prompts: int = 8, tokens: int = 256, hidden: int = 512, batch_size: int = 1
) -> dict[str, Any]:
    """Seconds per sample of file and store mode against one real vLLM server, interleaved in
    the same run, and their ratio (file / store). Starts and stops its own server; leaves
    nothing in ``/dev/shm`` or on disk.
    """
    from dataflow.launch.config import TargetSection
    from dataflow.launch.engines.vllm import VLLMTargetEngine
    from dataflow.launch.engines.vllm_server import ManagedVLLMServer
    from dataflow.store import open_store

    python = os.environ.get("DATAFLOW_VLLM_PYTHON") or sys.executable
    shm = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        model_dir = _tiny_llama(Path(tmp) / "model", hidden)
        target = TargetSection(
            engine="vllm",
            model_dir=str(model_dir),
            dtype="float32",
            aux_layer_ids=AUX,
            batch_size=batch_size,
            vllm={"python": python, "max_model_len": tokens + 64, "startup_timeout_s": 600.0},
        )
        server = ManagedVLLMServer(target)
        server.start()
        store = open_store(f"shm://{shm}")
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
        per_sample: dict[str, list[float]] = {"file": [], "store": []}
        cpu: dict[str, list[float]] = {"file": [], "store": []}
        try:
            _file_round(engines["file"], store, _tasks(2, tokens, "warm-f"))  # warm-up
            _store_round(engines["store"], store, _tasks(2, tokens, "warm-s"))
            for r in range(rounds):
                order = ("file", "store") if r % 2 == 0 else ("store", "file")
                for mode in order:
                    run = _file_round if mode == "file" else _store_round
                    wall, spent = run(engines[mode], store, _tasks(prompts, tokens, f"{mode}-{r}"))
                    per_sample[mode].append(wall)
                    cpu[mode].append(spent)
        finally:
            for engine in engines.values():
                engine.close()
            store.gc()
            store.close()
            server.stop()
    file_s = statistics.median(per_sample["file"])
    store_s = statistics.median(per_sample["store"])
    file_cpu = statistics.median(cpu["file"])
    store_cpu = statistics.median(cpu["store"])
    return {
        "file_s_per_sample": file_s,
        "store_s_per_sample": store_s,
        "ratio": file_s / store_s,
        "file_cpu_s_per_sample": file_cpu,
        "store_cpu_s_per_sample": store_cpu,
        "cpu_ratio": file_cpu / store_cpu,
        "target_ratio": TARGET_RATIO,
        "rounds": per_sample,
        "cpu_rounds": cpu,
        "prompts": prompts,
        "tokens": tokens,
        "hidden": hidden,
        "load_avg": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print the same-run ratio (``--json`` for the full record)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure_capture_modes(args.rounds, args.prompts, args.tokens, args.hidden)
    if args.json:
        print(json.dumps(result, indent=2))
    load = ", ".join(f"{x:.2f}" for x in result["load_avg"])
    verdict = "meets" if result["ratio"] >= TARGET_RATIO else "misses"
    print(
        f"vllm capture per sample ({args.tokens} tokens, H={args.hidden}): file "
        f"{result['file_s_per_sample'] * 1e3:.1f} ms, store {result['store_s_per_sample'] * 1e3:.1f} "
        f"ms; file/store = {result['ratio']:.2f}x ({verdict} the >= {TARGET_RATIO}x target); "
        f"producer CPU per sample: file {result['file_cpu_s_per_sample'] * 1e3:.1f} ms, store "
        f"{result['store_cpu_s_per_sample'] * 1e3:.1f} ms = {result['cpu_ratio']:.2f}x; "
        f"load average {load}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
