"""Store throughput for one EAGLE3 8B-shaped 2,048-token sample, producer and consumer processes.

Workload (issue 3): input_ids int64[2048], loss_mask int64[2048], hidden_state
bf16[1,2048,4096], aux_hidden_state bf16[1,2048,12288] (~64 MiB). Each repetition: this process
``put``s the sample and sends the ref (a JSON line) to a consumer process, which ``get``s it,
touches every page of every tensor (so a lazily mapped store pays for its page faults) and
``release``s it (consume-once: the store frees it); the consumer replies with its timings.
Time of one repetition = put + get + touch + release. Baselines, measured in the same run on
the same bytes:

- memcpy: ``clone()`` of every tensor, then dropping the clones (allocation, copy, free);
- raw file: write the bytes to a new file in the same directory, read them back into fresh
  memory, unlink it (``+fsync``: with an fsync after the write, the durability dir:// adds).

- one copy into a preallocated buffer: ``copy_`` of every tensor into buffers allocated and
  faulted in once, before the run (the least a put into shared memory can cost).

Targets: shm (one segment per sample) >= 0.8x memcpy; shm with an arena (issue 15: producer
process put + consumer process get + touch + release) <= 2x one copy into a preallocated buffer;
dir >= 0.7x raw file write+read (on /dev/shm and on disk). The 1-minute load average at the
start and end of the run is in the JSON output.

Usage: python bench_store.py [--repeat N] [--disk-dir PATH] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from dataflow.contracts import SampleRef
from dataflow.contracts.codec import dumps, loads
from dataflow.store import open_store

TOKENS, HIDDEN = 2048, 4096
ARENA_ROW = "shm:// cross-process put+get+release"
SEGMENT_ROW = "shm:// (arena off: a segment per sample) cross-process put+get+release"
PAGE = 4096


def workload() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, 128_000, (TOKENS,), generator=g),
        "loss_mask": torch.randint(0, 2, (TOKENS,), generator=g),
        "hidden_state": torch.randn(1, TOKENS, HIDDEN, generator=g).to(torch.bfloat16),
        "aux_hidden_state": torch.randn(1, TOKENS, 3 * HIDDEN, generator=g).to(torch.bfloat16),
    }


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def touch(tensors: dict[str, torch.Tensor]) -> int:
    """Read one byte of every page (faults in lazily mapped memory)."""
    return sum(int(t.reshape(-1).view(torch.uint8)[::PAGE].sum()) for t in tensors.values())


@dataclass
class Row:
    name: str
    where: str
    median_s: float
    min_s: float
    gbps_median: float
    gbps_min_time: float
    baseline: str = ""
    ratio: float | None = None
    target: float | None = None
    relation: str = ">="
    """">=": a speed (baseline time / store time); "<=": a cost (store time / baseline time)."""

    @property
    def verdict(self) -> str:
        if self.target is None or self.ratio is None:
            return ""
        if self.relation == "<=":
            return "meets" if self.ratio <= self.target else "ABOVE"
        return "meets" if self.ratio >= self.target else "BELOW"


def row(name: str, where: str, times: list[float], size: int) -> Row:
    med, low = statistics.median(times), min(times)
    return Row(name, where, med, low, size / med / 1e9, size / low / 1e9)


# ---------------------------------------------------------------------- baselines


def memcpy_baseline(tensors: dict[str, torch.Tensor]) -> Callable[[], None]:
    def once() -> None:
        clones = [t.clone() for t in tensors.values()]
        del clones

    return once


def preallocated_copy_baseline(tensors: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One copy of every tensor into buffers allocated (and faulted in) once, up front."""
    targets = [torch.empty_like(t) for t in tensors.values()]
    for target, t in zip(targets, tensors.values(), strict=True):
        target.copy_(t)  # fault the pages in now, not in the timed copies

    def once() -> None:
        for target, t in zip(targets, tensors.values(), strict=True):
            target.copy_(t)

    return once


def raw_file_baseline(
    tensors: dict[str, torch.Tensor], directory: str, fsync: bool
) -> Callable[[], None]:
    views = [t.reshape(-1).view(torch.uint8).numpy() for t in tensors.values()]
    size = sum(v.size for v in views)
    path = os.path.join(directory, f"bench-raw-{uuid.uuid4().hex}")

    def once() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        offset = 0
        for v in views:
            offset += os.pwrite(fd, v.data, offset)
        if fsync:
            os.fsync(fd)
        os.close(fd)
        out = torch.empty(size, dtype=torch.uint8)
        fd = os.open(path, os.O_RDONLY)
        os.preadv(fd, [out.numpy().data], 0)
        os.close(fd)
        os.unlink(path)
        del out

    return once


# ---------------------------------------------------------------------- store, two processes


def consumer(uri: str, options_json: str) -> None:
    store = open_store(uri, **json.loads(options_json))
    for line in sys.stdin:
        ref = loads(line, SampleRef)
        start = time.perf_counter()
        tensors, handle = store.get(ref)
        touch(tensors)
        store.release(handle)
        del tensors  # timed: dropping the views is part of giving the memory back
        print(time.perf_counter() - start, flush=True)
    store.close()


def paired(
    uri: str,
    options: dict[str, object],
    tensors: dict[str, torch.Tensor],
    baseline: Callable[[], None],
    repeat: int,
) -> tuple[list[float], list[float]]:
    """Alternate one store round trip and one baseline op, so both see the same machine load.

    Returns (store times, baseline times); the first two pairs are warm-up.
    """
    child = subprocess.Popen(
        [sys.executable, __file__, "--consumer", uri, json.dumps(options)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    store = open_store(uri, **options)
    store_times, base_times = [], []
    try:
        for i in range(repeat + 2):
            start = time.perf_counter()
            ref = store.put(f"bench-{i}", tensors)
            put_s = time.perf_counter() - start
            child.stdin.write(dumps(ref) + "\n")
            child.stdin.flush()
            get_s = float(child.stdout.readline())
            start = time.perf_counter()
            baseline()
            base_s = time.perf_counter() - start
            if i >= 2:
                store_times.append(put_s + get_s)
                base_times.append(base_s)
        left = store.health()
        if left.resident_samples:  # the consumer freed everything: nothing may remain
            raise RuntimeError(f"{uri}: samples left after the run: {left}")
    finally:
        child.stdin.close()
        child.wait(timeout=60)
        child.stdout.close()
        store.close()
    return store_times, base_times


# ---------------------------------------------------------------------- main


def compare(
    name: str,
    where: str,
    pair: tuple[list[float], list[float]],
    base_name: str,
    target: float | None,
    size: int,
    relation: str = ">=",
) -> list[Row]:
    store_times, base_times = pair
    in_ram = base_name.startswith(("memcpy", "one copy"))
    base = row(base_name, "RAM" if in_ram else where, base_times, size)
    store = row(name, where, store_times, size)
    store.baseline, store.target, store.relation = base_name, target, relation
    # Median of per-pair ratios: each pair ran back to back under the same load.
    pairs = zip(base_times, store_times, strict=True)
    if relation == "<=":
        store.ratio = statistics.median(s / b for b, s in pairs)
    else:
        store.ratio = statistics.median(b / s for b, s in pairs)
    return [base, store]


def measure(repeat: int, disk_dir: str) -> tuple[int, list[Row]]:
    tensors = workload()
    size = nbytes(tensors)
    name = f"bench{uuid.uuid4().hex[:8]}"
    pair = paired(f"shm://{name}", {}, tensors, memcpy_baseline(tensors), repeat)
    rows = compare("shm://", "/dev/shm", pair, "memcpy (clone)", 0.8, size)
    one_copy = "one copy into a preallocated buffer (same run)"
    arena = {"arena_bytes": 4 * size}
    pair = paired(f"shm://{name}a", arena, tensors, preallocated_copy_baseline(tensors), repeat)
    rows += compare(ARENA_ROW, "/dev/shm", pair, one_copy, 2.0, size, "<=")
    # The same round trip without an arena (one new segment per sample), for reference.
    pair = paired(f"shm://{name}s", {}, tensors, preallocated_copy_baseline(tensors), repeat)
    rows += compare(SEGMENT_ROW, "/dev/shm", pair, one_copy, None, size, "<=")[1:]
    for where in ("/dev/shm", disk_dir):
        for fsync in (False, True):
            suffix = "+fsync" if fsync else ""
            root = tempfile.mkdtemp(prefix="bench-dir-", dir=where)
            try:
                pair = paired(
                    f"dir://{root}/s",
                    {"fsync": fsync},
                    tensors,
                    raw_file_baseline(tensors, where, fsync),
                    repeat,
                )
            finally:
                for dirpath, _, names in os.walk(root, topdown=False):
                    for n in names:
                        os.unlink(os.path.join(dirpath, n))
                    os.rmdir(dirpath)
            rows += compare(
                f"dir:// fsync={fsync}", where, pair, f"raw write+read{suffix}", 0.7, size
            )
    return size, rows


def table(size: int, rows: list[Row]) -> str:
    lines = [
        f"sample: {size / 2**20:.1f} MiB; times per put+get+touch+release (store) or per op (baselines)",
        "",
        "| path | where | median ms | min ms | GB/s (median) | GB/s (min) | speed vs baseline | target |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if r.ratio is None:
            vs = "(baseline)"
        elif r.relation == "<=":
            vs = f"{r.ratio:.2f}x the time of {r.baseline}"
        else:
            vs = f"{r.ratio:.2f}x {r.baseline}"
        target = f"{r.relation} {r.target}x: {r.verdict}" if r.target is not None else ""
        lines.append(
            f"| {r.name} | {r.where} | {r.median_s * 1e3:.1f} | {r.min_s * 1e3:.1f} | "
            f"{r.gbps_median:.2f} | {r.gbps_min_time:.2f} | {vs} | {target} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--disk-dir", default=tempfile.gettempdir())
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--consumer", nargs=2, metavar=("URI", "OPTIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consumer:
        consumer(*args.consumer)
        return
    load_start = os.getloadavg()[0]
    size, rows = measure(args.repeat, args.disk_dir)
    load_end = os.getloadavg()[0]
    if args.json:
        out = {
            "benchmark": "store",
            "sample_bytes": size,
            "repeat": args.repeat,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average": [load_start, load_end],
            "rows": [{**asdict(r), "verdict": r.verdict} for r in rows],
        }
        print(json.dumps(out, indent=2))
    else:
        print(table(size, rows))
        print(f"\n1-minute load average: {load_start:.1f} at the start, {load_end:.1f} at the end")


if __name__ == "__main__":
    main()
