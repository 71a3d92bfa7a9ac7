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

Rounds alternate the two sides; the ratio is paired (per round, median plane step over median
bare step, process CPU time, first step of each round left out), and the figure is the median
over rounds, as in bench_train. Wall time is printed beside it.

    python bench_plane.py [--steps 3] [--rounds 12] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import _durations, _now, bare_loop, model_config, put_features, trainer_config

from dataflow.control import ReleasePolicy, open_ledger
from dataflow.control.controller import Controller
from dataflow.control.window import WindowShape
from dataflow.store import open_store
from dataflow.train.config import TrainerConfig
from dataflow.train.eagle3 import Eagle3Objective
from dataflow.train.loader import FeatureDataLoader
from dataflow.train.optim import WarmupCosineSchedule, build_adamw

MAX_RATIO = 1.01
_names = itertools.count()


def plane_loop(
    count: int, seq_len: int, config: TrainerConfig, precision: str, batch_size: int
) -> tuple[list[tuple[float, float]], dict[str, int]]:
    """The bare loop fed through the colocated plane; (wall, CPU) s per step and what the plane
    left behind (resident features, committed/trained counts) to check it did the work."""
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
    ends = [_now()]
    for step in range(1, (config.max_steps or 0) + 1):
        ids: list[str] = []
        for _ in range(accum):
            batch = next(batches)
            ids.extend(batch.sample_ids)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(batch.tensors)
            (out.loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(params, config.optim.max_grad_norm or float("inf"))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        consumer.ack(step, ids)
        ends.append(_now())
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
    return _durations(ends), left


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", nargs="?", const="-", help="also emit JSON (stdout or file)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    per_step = args.batch_size * args.accumulation
    count = per_step * args.steps
    source = open_store("memory://bench-plane-source", retain_on_release=True)
    refs = put_features(source, count, args.seq_len)
    batches = list(FeatureDataLoader(source, refs=refs, batch_size=args.batch_size, shuffle=False))
    config = trainer_config(args.steps, args.accumulation)

    steps: dict[str, list[tuple[float, float]]] = {"bare": [], "plane": []}
    paired: dict[str, list[float]] = {"wall": [], "cpu": []}
    left: dict[str, int] = {}
    bare_loop(batches, trainer_config(1, args.accumulation), args.precision)  # warm-up
    for round_no in range(args.rounds):
        sides = ["bare", "plane"] if round_no % 2 == 0 else ["plane", "bare"]
        measured = {}
        for side in sides:
            if side == "bare":
                measured[side] = bare_loop(batches, config, args.precision)[1:]
            else:
                durations, left = plane_loop(
                    count, args.seq_len, config, args.precision, args.batch_size
                )
                measured[side] = durations[1:]
            steps[side] += measured[side]
        for i, kind in enumerate(("wall", "cpu")):
            paired[kind].append(
                statistics.median(v[i] for v in measured["plane"])
                / statistics.median(v[i] for v in measured["bare"])
            )
    # the plane did its work: every sample trained once, no feature left resident
    assert left == {"resident_features": 0, "trained": count}, left
    ratio = {kind: statistics.median(paired[kind]) for kind in ("wall", "cpu")}
    medians = {
        side: {
            kind: statistics.median(v[i] for v in values) for i, kind in enumerate(("wall", "cpu"))
        }
        for side, values in steps.items()
    }
    result = {
        "benchmark": "bench-plane",
        "precision": args.precision,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "samples_per_step": per_step,
        "seq_len": args.seq_len,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
        "median_s_per_step": medians,
        "round_ratios": paired,
        "cpu_overhead_ratio": ratio["cpu"],
        "wall_overhead_ratio": ratio["wall"],
        "max_ratio": MAX_RATIO,
        "passed": ratio["cpu"] <= MAX_RATIO,
    }
    print(
        f"bench-plane  ({args.precision}, {per_step} samples x {args.seq_len} tokens per step, "
        f"{args.steps} steps x {args.rounds} rounds, load average "
        f"{result['load_average_1m']:.1f})"
    )
    for side in ("bare", "plane"):
        print(
            f"{side:<7} median CPU s/step {medians[side]['cpu']:.4f}  "
            f"wall s/step {medians[side]['wall']:.4f}"
        )
    verdict = "PASS" if result["passed"] else "FAIL"
    print(
        f"colocated plane / bare loop, CPU s/step (median of rounds): {ratio['cpu']:.4f} "
        f"(limit {MAX_RATIO}) {verdict}; wall: {ratio['wall']:.4f}"
    )
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
