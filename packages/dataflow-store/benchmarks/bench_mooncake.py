"""mooncake:// against bare Mooncake put_from/get_into on the same 64 MiB sample, same run.

Workload (issue 3): input_ids int64[2048], loss_mask int64[2048], hidden_state
bf16[1,2048,4096], aux_hidden_state bf16[1,2048,12288] (~64 MiB). A producer (this process)
and a consumer process share one ``mooncake_master`` (started here on loopback unless
``--master HOST:PORT`` is given); only the producer mounts a segment, so every read crosses the
transfer engine (loopback TCP), as a trainer on another host would.

Each repetition runs, back to back, one round of each path on the same tensors:

- store: producer ``put`` (MooncakeFeatureStore, hard-pinned) and sends the ref as a JSON line;
  the consumer ``get``s it, touches every page and ``release``s it (consume-once: freed);
- bare: producer registers each tensor, ``put_from``s it (hard-pinned, one key per tensor) and
  unregisters it; the consumer allocates empty tensors, registers them, ``get_into`` each, touches
  every page, unregisters and ``remove(force=True)``s the keys.

Both paths use the same two Mooncake clients. Time of a round = producer time + consumer time.
Reported: median and min per path, GB/s, and the median of per-round ratios bare/store (target
>= 0.7: the store may cost at most ~43% more than the bare calls).

Usage: python bench_mooncake.py [--repeat N] [--master HOST:PORT] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dataflow.contracts import SampleRef
from dataflow.contracts.codec import dumps, loads
from dataflow.store import open_store
from dataflow.store.mooncake_client import MooncakeClient
from dataflow.store.mooncake_settings import settings_from_uri

TOKENS, HIDDEN = 2048, 4096
PAGE = 4096
TARGET = 0.7


def workload() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, 128_000, (TOKENS,), generator=g),
        "loss_mask": torch.randint(0, 2, (TOKENS,), generator=g),
        "hidden_state": torch.randn(1, TOKENS, HIDDEN, generator=g).to(torch.bfloat16),
        "aux_hidden_state": torch.randn(1, TOKENS, 3 * HIDDEN, generator=g).to(torch.bfloat16),
    }


def touch(tensors: dict[str, torch.Tensor]) -> int:
    """Read one byte of every page of every tensor."""
    return sum(int(t.reshape(-1).view(torch.uint8)[::PAGE].sum()) for t in tensors.values())


def connect(uri: str, segment: str) -> MooncakeClient:
    return MooncakeClient.connect(settings_from_uri(uri, {"segment": segment, "buffer": "16MiB"}))


# ---------------------------------------------------------------------- consumer process


def consume_store(store: Any, line: str) -> None:
    ref = loads(line, SampleRef)
    tensors, handle = store.get(ref)
    touch(tensors)
    store.release(handle)


def consume_bare(binding: Any, line: str) -> None:
    request = json.loads(line)
    keys: list[str] = []
    outs: dict[str, torch.Tensor] = {}
    for name, (shape, dtype, key) in request.items():
        out = torch.empty(shape, dtype=getattr(torch, dtype))
        nbytes = out.numel() * out.element_size()
        binding.register_buffer(out.data_ptr(), nbytes)
        got = binding.get_into(key, out.data_ptr(), nbytes)
        binding.unregister_buffer(out.data_ptr())
        if got != nbytes:
            raise RuntimeError(f"bare get_into of {key!r} returned {got}, expected {nbytes}")
        outs[name] = out
        keys.append(key)
    touch(outs)
    for key in keys:
        rc = binding.remove(key, force=True)
        if rc != 0:
            raise RuntimeError(f"bare remove of {key!r} returned {rc}")


def consumer(uri: str) -> None:
    client = connect(uri, "0")  # mounts nothing: every read crosses the transfer engine
    store = open_store(uri, client=client)
    for line in sys.stdin:
        kind, _, payload = line.partition(" ")
        start = time.perf_counter()
        if kind == "store":
            consume_store(store, payload)
        else:
            consume_bare(client.binding, payload)
        print(time.perf_counter() - start, flush=True)
    store.close()
    client.close()


# ---------------------------------------------------------------------- producer (this process)


class Producer:
    """Both paths' producer side over one client, talking to one consumer process."""

    def __init__(self, uri: str, tensors: dict[str, torch.Tensor]) -> None:
        from mooncake.store import ReplicateConfig

        self.tensors = tensors
        self.client = connect(uri, "512MiB")
        self.store = open_store(uri, client=self.client)
        self.binding = self.client.binding
        self.config = ReplicateConfig()
        self.config.replica_num = 1
        self.config.with_hard_pin = True
        for t in tensors.values():  # the bare path's best case: registered once, up front
            self.binding.register_buffer(t.data_ptr(), t.numel() * t.element_size())
        self.child = subprocess.Popen(
            [sys.executable, __file__, "--consumer", uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _ask(self, line: str) -> float:
        assert self.child.stdin is not None and self.child.stdout is not None
        self.child.stdin.write(line + "\n")
        self.child.stdin.flush()
        reply = self.child.stdout.readline()
        if not reply:
            raise RuntimeError("the consumer process died")
        return float(reply)

    def store_round(self, i: int) -> float:
        start = time.perf_counter()
        ref = self.store.put(f"bench-{i}", self.tensors)
        return time.perf_counter() - start + self._ask("store " + dumps(ref))

    def bare_round(self, i: int) -> float:
        request = {}
        start = time.perf_counter()
        for name, t in self.tensors.items():
            key = f"bare/{os.getpid()}/{i}/{name}"
            nbytes = t.numel() * t.element_size()
            self.binding.register_buffer(t.data_ptr(), nbytes)
            rc = self.binding.put_from(key, t.data_ptr(), nbytes, self.config)
            self.binding.unregister_buffer(t.data_ptr())
            if rc != 0:
                raise RuntimeError(f"bare put_from of {key!r} returned {rc}")
            request[name] = (list(t.shape), str(t.dtype).removeprefix("torch."), key)
        return time.perf_counter() - start + self._ask("bare " + json.dumps(request))

    def close(self) -> None:
        if self.child.stdin is not None:
            self.child.stdin.close()
        self.child.wait(timeout=120)
        if self.child.stdout is not None:
            self.child.stdout.close()
        left = self.store.health()
        self.store.close()
        self.client.close()
        if left.resident_samples or left.pending_frees:
            raise RuntimeError(f"samples left after the run: {left}")


@contextmanager
def master_uri(address: str | None) -> Iterator[str]:
    if address:
        yield f"mooncake://{address}"
        return
    from dataflow_testing.mooncake import MooncakeMaster  # type: ignore[import-untyped]

    master = MooncakeMaster()
    try:
        yield master.uri
    finally:
        master.stop()


@dataclass
class Row:
    path: str
    median_s: float
    min_s: float
    gbps_median: float
    gbps_best: float
    ratio: float | None = None


def row(path: str, times: list[float], size: int) -> Row:
    med, low = statistics.median(times), min(times)
    return Row(path, med, low, size / med / 1e9, size / low / 1e9)


def measure(repeat: int, address: str | None) -> tuple[int, list[Row]]:
    tensors = workload()
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    store_times: list[float] = []
    bare_times: list[float] = []
    with master_uri(address) as uri:
        producer = Producer(uri, tensors)
        try:
            for i in range(repeat + 2):  # two warm-up rounds
                # Alternate which path goes first so neither always inherits a warm cache.
                if i % 2:
                    s, b = producer.store_round(i), producer.bare_round(i)
                else:
                    b, s = producer.bare_round(i), producer.store_round(i)
                if i >= 2:
                    store_times.append(s)
                    bare_times.append(b)
        finally:
            producer.close()
    bare = row("bare put_from/get_into", bare_times, size)
    store = row("mooncake:// store", store_times, size)
    store.ratio = statistics.median(b / s for b, s in zip(bare_times, store_times, strict=True))
    return size, [bare, store]


def table(size: int, repeat: int, rows: list[Row]) -> str:
    lines = [
        f"sample: {size / 2**20:.1f} MiB; {repeat} rounds; time = producer put + consumer "
        "get, touch, free",
        "",
        "| path | median ms | min ms | GB/s (median) | GB/s (best) | vs bare | target |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if r.ratio is None:
            vs, target = "(baseline)", ""
        else:
            verdict = "meets" if r.ratio >= TARGET else "BELOW"
            vs, target = f"{r.ratio:.2f}x", f">= {TARGET}x: {verdict}"
        lines.append(
            f"| {r.path} | {r.median_s * 1e3:.1f} | {r.min_s * 1e3:.1f} | "
            f"{r.gbps_median:.2f} | {r.gbps_best:.2f} | {vs} | {target} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--master", help="HOST:PORT of a running mooncake_master")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--consumer", metavar="URI", help=argparse.SUPPRESS)
    parser.add_argument("--disk-dir", help=argparse.SUPPRESS)  # bench-store passes it to all
    args = parser.parse_args()
    if args.consumer:
        consumer(args.consumer)
        return
    size, rows = measure(args.repeat, args.master)
    if args.json:
        out = {
            "benchmark": "mooncake",
            "sample_bytes": size,
            "repeat": args.repeat,
            "target_ratio": TARGET,
            "cpus": os.cpu_count(),
            "rows": [asdict(r) for r in rows],
        }
        print(json.dumps(out, indent=2))
    else:
        print(table(size, args.repeat, rows))


if __name__ == "__main__":
    main()
