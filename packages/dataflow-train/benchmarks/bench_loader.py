"""bench-loader: FeatureDataLoader's cost per sample beyond a bare loop stacking the same tensors.

Issue 15 item 5. Workload: small EAGLE3-shaped samples (``--tokens`` tokens, ``--hidden``
hidden size: input_ids and loss_mask int64 [1, T], hidden_state float32 [1, T, H],
aux_hidden_state float32 [1, T, 3H]), all of one length, so the figure is the loader's own
per-sample work (get, checks, collation, release, prefetch hand-off), not memory bandwidth.

- bare: for each batch, ``torch.cat`` of the same tensors along dim 0 plus an all-ones
  attention mask: the same batch the loader yields; with prefetch, the bare loop does the same
  on a thread handing its batches over the way the loader does (a ``SimpleQueue`` of batches,
  ``prefetch`` slot tokens coming back), so only the loader's own work differs; the overhead
  over the single-threaded bare loop is reported beside it;
- loader: ``FeatureDataLoader`` over a ``memory://`` store, in refs mode (a fixed ref list,
  ``retain_on_release``) and in queue mode (a consume-once store fed through a ref queue; the
  release frees each sample; puts are untimed), batch 1 and 8, prefetch 0 and 2.

Rounds alternate the two sides; each round times every sample once with process CPU time (the
prefetch thread counts), the loader from its construction (the plan checks every ref) to its
``close`` (the prefetch thread joined, as the bare thread is); overhead = (loader - bare) CPU s / samples, the median over rounds.
Target: <= 20 us per sample in every case.

    python bench_loader.py [--rounds 8] [--samples 256] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from dataflow.contracts import SampleRef
from dataflow.store import open_store
from dataflow.train.loader import FeatureDataLoader

TARGET_US = 20.0
_names = itertools.count()


def samples(count: int, tokens: int, hidden: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(0, 8192, (1, tokens), generator=gen),
            "loss_mask": torch.ones(1, tokens, dtype=torch.int64),
            "hidden_state": torch.randn(1, tokens, hidden, generator=gen),
            "aux_hidden_state": torch.randn(1, tokens, 3 * hidden, generator=gen),
        }
        for _ in range(count)
    ]


class ListQueue:
    """A RefQueue over a fixed list: each ref once, then the end of the stream."""

    def __init__(self, refs: list[SampleRef]) -> None:
        self._refs = collections.deque(refs)

    def get(self, timeout: float | None = None) -> SampleRef | None:
        return self._refs.popleft() if self._refs else None

    def close(self) -> None:
        self._refs.clear()


def _bare_batches(data: list[dict[str, torch.Tensor]], batch_size: int):
    names = list(data[0])
    for first in range(0, len(data) - batch_size + 1, batch_size):
        rows = data[first : first + batch_size]
        batch = {name: torch.cat([row[name] for row in rows]) for name in names}
        batch["attention_mask"] = torch.ones(
            (batch_size, rows[0]["input_ids"].shape[1]), dtype=torch.int64
        )
        yield batch


def bare(data: list[dict[str, torch.Tensor]], batch_size: int, prefetch: int = 0) -> float:
    start = time.process_time()
    if prefetch == 0:
        for _ in _bare_batches(data, batch_size):
            pass
        return time.process_time() - start
    # The loader's own hand-off: batches through a SimpleQueue, one slot token back per batch.
    out: queue.SimpleQueue = queue.SimpleQueue()
    slots: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(prefetch):
        slots.put(None)

    def work() -> None:
        for batch in _bare_batches(data, batch_size):
            slots.get()
            out.put(batch)
        slots.get()
        out.put(None)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    while out.get() is not None:
        slots.put(None)
    worker.join()
    return time.process_time() - start


def loader_refs(store, refs: list[SampleRef], batch_size: int, prefetch: int) -> float:
    start = time.process_time()  # the plan's checks of the refs are per-sample work too
    loader = FeatureDataLoader(
        store, refs=refs, batch_size=batch_size, shuffle=False, prefetch=prefetch
    )
    for _ in loader:
        pass
    loader.close()
    return time.process_time() - start


def loader_queue(data: list[dict[str, torch.Tensor]], batch_size: int, prefetch: int) -> float:
    store = open_store(f"memory://bench-loader-{next(_names)}")
    refs = [store.put(f"q{i}", tensors) for i, tensors in enumerate(data)]  # untimed
    start = time.process_time()
    loader = FeatureDataLoader(
        store, queue=ListQueue(refs), batch_size=batch_size, prefetch=prefetch
    )
    for _ in loader:
        pass
    loader.close()
    spent = time.process_time() - start
    assert store.health().resident_samples == 0  # every release freed its sample
    store.close()
    return spent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--samples", type=int, default=256, help="samples per round")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", nargs="?", const="-", help="also emit JSON (stdout or file)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = samples(args.samples, args.tokens, args.hidden)
    retained = open_store("memory://bench-loader-refs", retain_on_release=True)
    refs = [retained.put(f"r{i}", tensors) for i, tensors in enumerate(data)]
    load_start = os.getloadavg()[0]
    rows = []
    for mode, batch_size, prefetch in itertools.product(("refs", "queue"), (1, 8), (0, 2)):

        def run_loader(b: int = batch_size, p: int = prefetch, m: str = mode) -> float:
            if m == "refs":
                return loader_refs(retained, refs, b, p)
            return loader_queue(data, b, p)

        def run_bare(b: int = batch_size, p: int = prefetch) -> float:
            return bare(data, b, p)

        def run_bare_1thread(b: int = batch_size) -> float:
            return bare(data, b, 0)

        sides = [run_loader, run_bare] + ([run_bare_1thread] if prefetch else [])
        for side in sides:  # warm-up
            side()
        over, over_1thread, ratio = [], [], []
        for r in range(args.rounds):
            spent = {}
            for side in sides if r % 2 == 0 else sides[::-1]:
                spent[side] = side()
            over.append((spent[run_loader] - spent[run_bare]) / args.samples * 1e6)
            ratio.append(spent[run_loader] / spent[run_bare])
            if prefetch:
                over_1thread.append(
                    (spent[run_loader] - spent[run_bare_1thread]) / args.samples * 1e6
                )
        overhead = statistics.median(over)
        rows.append(
            {
                "case": f"{mode} mode, batch {batch_size}, prefetch {prefetch}",
                "mode": mode,
                "batch_size": batch_size,
                "prefetch": prefetch,
                "baseline": "bare loop"
                + (f" on a thread, queue of {prefetch}" if prefetch else ""),
                "overhead_us": overhead,
                "overhead_vs_single_thread_bare_us": (
                    statistics.median(over_1thread) if prefetch else overhead
                ),
                "ratio": statistics.median(ratio),
                "met": overhead <= TARGET_US,
            }
        )
    result = {
        "benchmark": "bench-loader",
        "samples_per_round": args.samples,
        "rounds": args.rounds,
        "tokens": args.tokens,
        "hidden": args.hidden,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": [load_start, os.getloadavg()[0]],
        "target_us": TARGET_US,
        "rows": rows,
        "passed": all(row["met"] for row in rows),
    }
    print(
        f"bench-loader ({args.samples} samples x {args.tokens} tokens, hidden {args.hidden}, "
        f"{args.rounds} rounds, load average {load_start:.1f} -> {result['load_average_1m'][1]:.1f})"
    )
    for row in rows:
        extra = (
            f"; {row['overhead_vs_single_thread_bare_us']:.1f} us over the 1-thread bare loop"
            if row["prefetch"]
            else ""
        )
        print(
            f"{row['case']:<34} overhead {row['overhead_us']:6.1f} us/sample "
            f"(loader/bare {row['ratio']:.2f}x{extra})  {'met' if row['met'] else 'NOT MET'}"
        )
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
