"""bench-plane: the colocated lightweight plane's cost against a bare PyTorch loop, same run.

What a ``local_colocated`` run adds between the producer and the optimizer, measured on the
training loop of ``bench_train.bare_loop`` (same EAGLE3 objective, seed, weights, AdamW,
schedule, clipping and samples):

- bare: the loop over batches already collated in memory;
- plane: the same loop, fed through the colocated plane exactly as a colocated online run wires
  it: the samples are put into a ``memory://`` store (consume-once: ``retain_on_release`` off)
  and their refs committed through the controller's producer side to a ``memory://`` ledger
  (untimed, the producer's part); the timed loop reads them from the consumer side's rank queue
  (window dispatch on rank 0) through ``FeatureDataLoader`` (get, collate, release — which
  frees the features), and acks every optimizer step in the ledger with ``on_ack`` release.

Each round builds both loops (fresh, identical models) and steps them in lockstep, the order
flipping every step (bare, plane, plane, bare, ...), so every plane step has a bare step right
beside it in time; each pair gives one ratio (CPU time of this thread: both loops run on it
alone; the first step of a round left out), and the figure is the median over every pair, with
its quartiles and range and the load over the run. Wall time is printed beside it, and the
plane's own calls are timed too (loader ``next`` and ledger ack): 1 + their CPU over the bare
step's is the plane's cost without the noise of the model's compute.

    python bench_plane.py [--steps 4] [--rounds 10] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import bare_loop, bare_steps, model_config, put_features, trainer_config
from paired import describe, load_1m, spread

from dataflow.control import ReleasePolicy, open_ledger
from dataflow.control.controller import Controller
from dataflow.control.window import WindowShape
from dataflow.store import open_store
from dataflow.train.config import TrainerConfig
from dataflow.train.eagle3 import Eagle3Objective
from dataflow.train.host_memory import retain_freed_host_memory
from dataflow.train.loader import FeatureDataLoader
from dataflow.train.optim import WarmupCosineSchedule, build_adamw

MAX_RATIO = 1.01
_names = itertools.count()


def plane_steps(
    count: int, seq_len: int, config: TrainerConfig, precision: str, batch_size: int
) -> Iterator[tuple[float, float, float]]:
    """The bare loop fed through the colocated plane, one optimizer step per ``next``: yields
    (wall, CPU, plane CPU) seconds of that step, plane CPU being this thread's time inside the
    plane's calls (loader ``next`` and the ledger ack). After the last step it checks what the
    plane left behind (every sample trained once, no feature resident) and stops."""
    name = f"plane{next(_names)}"
    store = open_store(f"memory://{name}", retain_on_release=False)
    ledger = open_ledger(f"memory://{name}")
    controller = Controller(ledger, aborter=store)
    accum = config.accumulation_steps
    consumer = controller.consumer(WindowShape(1, batch_size, accum), release=ReleasePolicy.ON_ACK)
    consumer.open("bench")
    producer = controller.producer()
    producer.open("bench", resume=True)
    producer.commit(put_features(store, count, seq_len))
    producer.close()

    torch.manual_seed(config.seed)
    model = Eagle3Objective(model_config(), seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_adamw(params, config.optim)
    schedule = WarmupCosineSchedule(optimizer, config.optim, config.total_steps or 1)
    loader = FeatureDataLoader(store, queue=consumer.queue(), batch_size=batch_size)
    batches = iter(loader)
    clock = time.thread_time
    for step in range(1, (config.max_steps or 0) + 1):
        began = time.perf_counter(), clock()
        plane = 0.0
        ids: list[str] = []
        for _ in range(accum):
            t = clock()
            batch = next(batches)
            plane += clock() - t
            ids.extend(batch.sample_ids)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(batch.tensors)
            (out.loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(params, config.optim.max_grad_norm or float("inf"))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        t = clock()
        consumer.ack(step, ids)
        plane += clock() - t
        yield time.perf_counter() - began[0], clock() - began[1], plane
    assert next(batches, None) is None  # the stream ended cleanly
    loader.close()
    consumer.finish()
    status = ledger.status()
    left = {
        "resident_features": store.health().resident_samples,
        "trained": status.samples.get("trained", 0) + status.samples.get("released", 0),
    }
    store.close()
    ledger.close()
    # the plane did its work: every sample trained once, no feature left resident
    assert left == {"resident_features": 0, "trained": count}, left


def lockstep_round(
    batches: list, count: int, seq_len: int, config: TrainerConfig, precision: str, batch_size: int
) -> tuple[list[tuple[float, float]], list[tuple[float, float, float]]]:
    """One round: a bare loop and a plane loop (fresh, identical models) stepped alternately,
    the order flipping every step (bare, plane, plane, bare, ...); (bare steps, plane steps)."""
    bare = bare_steps(batches, config, precision)
    plane = plane_steps(count, seq_len, config, precision, batch_size)
    out_bare: list[tuple[float, float]] = []
    out_plane: list[tuple[float, float, float]] = []
    for step in range(config.max_steps or 0):
        for side in ("bare", "plane") if step % 2 == 0 else ("plane", "bare"):
            if side == "bare":
                out_bare.append(next(bare))
            else:
                out_plane.append(next(plane))
    for rest in (bare, plane):
        assert next(rest, None) is None  # runs the plane's end-of-stream checks
    return out_bare, out_plane


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", nargs="?", const="-", help="also emit JSON (stdout or file)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step of a round is warm-up)")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Both loops under the Trainer's host-memory policy (as bench_train): without it each step
    # page-faults a varying share of its activations back in, split between the loops by chance.
    host_memory_retained = retain_freed_host_memory()

    per_step = args.batch_size * args.accumulation
    count = per_step * args.steps
    source = open_store("memory://bench-plane-source", retain_on_release=True)
    refs = put_features(source, count, args.seq_len)
    batches = list(
        FeatureDataLoader(
            source, refs=refs, batch_size=args.batch_size, shuffle=False, reuse_buffers=False
        )
    )
    config = trainer_config(args.steps, args.accumulation)

    steps: dict[str, list[tuple[float, ...]]] = {"bare": [], "plane": []}
    paired: dict[str, list[float]] = {"wall": [], "cpu": [], "attributed": []}
    loads = [load_1m()]
    bare_loop(batches, trainer_config(1, args.accumulation), args.precision)  # warm-up
    for _ in range(args.rounds):
        bare, plane = lockstep_round(
            batches, count, args.seq_len, config, args.precision, args.batch_size
        )
        for b, p in zip(bare[1:], plane[1:], strict=True):  # step 1: warm-up, left out
            paired["wall"].append(p[0] / b[0])
            paired["cpu"].append(p[1] / b[1])
            paired["attributed"].append(1 + p[2] / b[1])
        steps["bare"] += bare[1:]
        steps["plane"] += plane[1:]
        loads.append(load_1m())
    ratio_spread = {kind: spread(values) for kind, values in paired.items()}
    ratio = {kind: ratio_spread[kind]["median"] for kind in paired}
    medians = {
        side: {
            kind: statistics.median(v[i] for v in values) for i, kind in enumerate(("wall", "cpu"))
        }
        for side, values in steps.items()
    }
    plane_ms = statistics.median(p[2] for p in steps["plane"]) * 1e3
    result = {
        "benchmark": "bench-plane",
        "method": "lockstep: bare and plane loops stepped alternately (order flipping every "
        "step); one ratio per step pair, median over pairs",
        "precision": args.precision,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "samples_per_step": per_step,
        "seq_len": args.seq_len,
        "torch_threads": torch.get_num_threads(),
        "host_memory_retained": host_memory_retained,
        "load_average_1m": loads[-1],
        "load": {"start": loads[0], "end": loads[-1], "min": min(loads), "max": max(loads)},
        "median_s_per_step": medians,
        "plane_cpu_ms_per_step": plane_ms,
        "round_ratios": paired,
        "ratio_spread": ratio_spread,
        "cpu_overhead_ratio": ratio["cpu"],
        "wall_overhead_ratio": ratio["wall"],
        "attributed_cpu_ratio": ratio["attributed"],
        "max_ratio": MAX_RATIO,
        "passed": ratio["cpu"] <= MAX_RATIO,
    }
    print(
        f"bench-plane  ({args.precision}, {per_step} samples x {args.seq_len} tokens per step, "
        f"{args.steps} steps x {args.rounds} rounds in lockstep, load average {loads[0]:.1f} -> "
        f"{loads[-1]:.1f} (min {min(loads):.1f}, max {max(loads):.1f}))"
    )
    for side in ("bare", "plane"):
        print(
            f"{side:<7} median CPU s/step {medians[side]['cpu']:.4f}  "
            f"wall s/step {medians[side]['wall']:.4f}"
        )
    print(f"plane's own calls (loader next + ledger ack): {plane_ms:.2f} ms CPU per step")
    verdict = "PASS" if result["passed"] else "FAIL"
    print(
        describe("plane / bare, CPU s/step", ratio_spread["cpu"])
        + f"  (limit {MAX_RATIO}) {verdict}"
    )
    print(describe("plane / bare, wall s/step", ratio_spread["wall"]))
    print(describe("1 + plane calls' CPU / bare step CPU", ratio_spread["attributed"]))
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
