"""The stores' per-sample hot paths (issue 15 item 2), each against a baseline in the same run.

Workload: the EAGLE3 8B-shaped 2,048-token sample of ``bench_store.py`` (~64 MiB).

- ``memory://`` in-process put + get + release (consume-once: the release frees it), CPU time
  per round trip; rounds alternate with a bare dict doing the same (store, look up, drop the
  same tensors) so the load shows in both. Target: <= 50 us per round trip (SpecForge's
  in-process store measured 61 us on this machine kind).
- ``dir://`` get on ``--dir`` (default the temp dir): ``get`` of a stored generation (read into
  private memory, as dir:// guarantees), paired with SpecForge's way of reading a shared-dir
  sample on the same bytes: map the file and ``clone`` every tensor — once on the very file
  dir:// wrote, once through ``torch.load(mmap=True)`` of a ``torch.save`` of the same tensors.
  Target: speed >= 1.0x each (no slower). Every tensor is touched (one byte a page) in both.

Ratios are medians of per-pair ratios (each pair back to back under the same load).

Usage: python bench_hot_paths.py [--rounds N] [--dir PATH] [--json]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_store import touch, workload

from dataflow.store import open_store
from dataflow.store.layout import read_header

MEMORY_TARGET_US = 50.0
DIR_TARGET = 1.0


def memory_round_trips(tensors: dict[str, torch.Tensor], rounds: int, per_round: int) -> dict:
    store = open_store("memory://bench-hot-paths")
    meta = {"num_tokens": int(tensors["input_ids"].numel())}
    bare: dict[str, dict[str, torch.Tensor]] = {}

    def store_round(offset: int) -> float:
        start = time.process_time()
        for i in range(offset, offset + per_round):
            ref = store.put(f"s{i}", tensors, meta)
            _, handle = store.get(ref)
            store.release(handle)
        return (time.process_time() - start) / per_round

    def bare_round(offset: int) -> float:
        start = time.process_time()
        for i in range(offset, offset + per_round):
            bare[f"s{i}"] = tensors
            _ = bare[f"s{i}"]
            del bare[f"s{i}"]
        return (time.process_time() - start) / per_round

    store_round(0)  # warm-up
    ours, base = [], []
    for r in range(rounds):
        offset = (r + 1) * per_round
        sides = (store_round, bare_round) if r % 2 == 0 else (bare_round, store_round)
        for side in sides:
            (ours if side is store_round else base).append(side(offset))
    left = store.health()
    assert left.resident_samples == 0 and left.active_leases == 0, left
    store.close()
    median_us = statistics.median(ours) * 1e6
    return {
        "name": "memory:// put+get+release (in-process)",
        "us_per_sample": median_us,
        "min_us_per_sample": min(ours) * 1e6,
        "baseline": "bare dict set+get+del",
        "baseline_us_per_sample": statistics.median(base) * 1e6,
        "target_us": MEMORY_TARGET_US,
        "met": median_us <= MEMORY_TARGET_US,
    }


def _mmap_clone(path: str) -> dict[str, torch.Tensor]:
    """SpecForge's shared-dir read on the same file: map it, clone every tensor out of it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    layout = read_header(mapped, size, path)
    out = {}
    for name, entry in layout.entries.items():
        raw = torch.frombuffer(
            mapped, dtype=torch.uint8, count=entry.end - entry.start, offset=entry.start
        )
        out[name] = raw.clone()
    return out


def dir_gets(tensors: dict[str, torch.Tensor], rounds: int, where: str) -> list[dict]:
    root = tempfile.mkdtemp(prefix="bench-hot-dir-", dir=where)
    try:
        store = open_store(f"dir://{root}/s", fsync=False, retain_on_release=True)
        ref = store.put("sample", tensors)
        stored = os.path.join(root, "s", "sample", f"{ref.generation}.safetensors")
        pickled = os.path.join(root, "sample.pt")
        torch.save(tensors, pickled)

        def ours() -> None:
            got, handle = store.get(ref)
            touch(got)
            store.release(handle)

        def mmap_clone() -> None:
            touch(_mmap_clone(stored))

        def torch_load_clone() -> None:
            loaded = torch.load(pickled, mmap=True, weights_only=True)
            touch({k: v.clone() for k, v in loaded.items()})

        baselines: dict[str, Callable[[], None]] = {
            "mmap + clone of the same file (SpecForge's shared-dir get)": mmap_clone,
            "torch.load(mmap=True) + clone of the same tensors (SpecForge's file format)": (
                torch_load_clone
            ),
        }
        rows = []
        for label, baseline in baselines.items():
            for fn in (ours, baseline):  # warm-up: page cache, allocator
                fn()
            ours_s, base_s = [], []
            for r in range(rounds):
                sides = (ours, baseline) if r % 2 == 0 else (baseline, ours)
                for fn in sides:
                    start = time.perf_counter()
                    fn()
                    (ours_s if fn is ours else base_s).append(time.perf_counter() - start)
            ratio = statistics.median(b / o for b, o in zip(base_s, ours_s, strict=True))
            rows.append(
                {
                    "name": f"dir:// get on {where}",
                    "ms": statistics.median(ours_s) * 1e3,
                    "baseline": label,
                    "baseline_ms": statistics.median(base_s) * 1e3,
                    "ratio": ratio,
                    "target": DIR_TARGET,
                    "met": ratio >= DIR_TARGET,
                }
            )
        store.abort("sample", "bench done")
        store.close()
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--per-round", type=int, default=2000, help="memory:// round trips")
    parser.add_argument("--repeat", type=int, default=None, help="alias of --rounds (bench-store)")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args()
    rounds = args.repeat or args.rounds
    tensors = workload()
    load_start = os.getloadavg()[0]
    memory = memory_round_trips(tensors, rounds, args.per_round)
    dirs = dir_gets(tensors, rounds, args.dir)
    out = {
        "benchmark": "store-hot-paths",
        "sample_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "rounds": rounds,
        "load_average_1m": [load_start, os.getloadavg()[0]],
        "memory": memory,
        "dir": dirs,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(
        f"store hot paths ({rounds} rounds, load average {load_start:.1f} -> "
        f"{out['load_average_1m'][1]:.1f})"
    )
    print(
        f"{memory['name']}: {memory['us_per_sample']:.1f} us CPU per sample (min "
        f"{memory['min_us_per_sample']:.1f}; {memory['baseline']} {memory['baseline_us_per_sample']:.2f} us); "
        f"target <= {MEMORY_TARGET_US} us: {'met' if memory['met'] else 'NOT MET'}"
    )
    for row in dirs:
        print(
            f"{row['name']}: {row['ms']:.1f} ms vs {row['baseline']} {row['baseline_ms']:.1f} ms: "
            f"speed {row['ratio']:.2f}x (target >= {DIR_TARGET}x: {'met' if row['met'] else 'NOT MET'})"
        )


if __name__ == "__main__":
    main()
