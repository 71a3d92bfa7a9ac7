"""bench-train: the trainer runtime's step time against a bare PyTorch loop, in the same run.

Both sides train the same EAGLE3 objective (same seed, same weights), on the same batches, with
the same AdamW, LR schedule and clipping. The bare loop gets the batches already collated in
memory; the runtime gets refs and does everything it does in production: store get + release,
collation, prefetch thread, fail-together agreement, ack hook, metrics JSONL, progress
bookkeeping.

The two run in lockstep: a hook of the Trainer runs one bare-loop step right after each Trainer
step, so under a load that changes by the second every Trainer step has a bare step on either
side of it. Each Trainer step k gives one ratio, its time over the mean of the bare steps just
before and just after it (a linear drift cancels); the first two steps of a round are warm-up
and left out; the figure is the median over every pair of every round, reported with its
quartiles and range and the load average over the run.

Time is measured twice. CPU time (the gate): for the bare step, the CPU of the thread it runs
on (one torch thread: it does all its work there); for the Trainer step, the whole process's
CPU between its boundaries minus the bare step's, so the prefetch thread's work counts against
the Trainer wherever it falls (overlap earns it nothing). On a shared machine (2 cores, many
jobs) wall time mostly measures the neighbours; it is printed beside it.

Both loops run in one process under the host-memory policy the Trainer sets
(:mod:`dataflow.train.host_memory`, set here before the warm-up too): under glibc's default
moving thresholds each step page-faults a varying share of its activations back in (4k-130k
faults, up to 0.2 s of kernel time a step), split between the two interleaved loops by chance.
Rounds of 10 steps give 8 pairs each (steps 0 and 1 are warm-up), 48 pairs by default.

    python bench_train.py [--steps 10] [--rounds 6] [--precision bf16|fp32] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paired import describe, load_1m, spread

from dataflow.contracts import TrainBatch
from dataflow.store import open_store
from dataflow.train.config import TrainerConfig
from dataflow.train.eagle3 import Eagle3Config, Eagle3Objective
from dataflow.train.hooks import AckHook, HookContext, StepEvent, TrainerHook
from dataflow.train.host_memory import retain_freed_host_memory
from dataflow.train.loader import FeatureDataLoader
from dataflow.train.metrics import JsonlMetrics
from dataflow.train.optim import OptimConfig, WarmupCosineSchedule, build_adamw
from dataflow.train.parallel.backend import LocalBackend
from dataflow.train.trainer import Trainer

MAX_RATIO = 1.05
HIDDEN = 256


def model_config() -> Eagle3Config:
    return Eagle3Config(
        hidden_size=HIDDEN,
        intermediate_size=688,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        vocab_size=8192,
        draft_vocab_size=2048,
        target_layers=(1, 5, 8),
        ttt_length=3,
    )


def put_features(store, count: int, length: int) -> list:
    gen = torch.Generator().manual_seed(0)
    refs = []
    for i in range(count):
        tensors = {
            "input_ids": torch.randint(0, 8192, (1, length), generator=gen),
            "loss_mask": torch.ones(1, length, dtype=torch.int64),
            "hidden_state": torch.randn(1, length, HIDDEN, generator=gen),
            "aux_hidden_state": torch.randn(1, length, 3 * HIDDEN, generator=gen),
        }
        refs.append(store.put(f"bench{i:04d}", tensors))
    return refs


def trainer_config(steps: int, accum: int) -> TrainerConfig:
    return TrainerConfig(
        run_id="bench",
        accumulation_steps=accum,
        max_steps=steps,
        total_steps=steps,
        optim=OptimConfig(lr=1e-4, warmup_steps=1, max_grad_norm=0.5),
        progress=True,
    )


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def bare_steps(
    batches: list[TrainBatch], config: TrainerConfig, precision: str
) -> Iterator[tuple[float, float]]:
    """The plain PyTorch loop, one optimizer step per ``next``: yields the (wall, CPU) seconds of
    that step (CPU of this thread: the bare loop runs on it alone), the model built untimed."""
    torch.manual_seed(config.seed)
    model = Eagle3Objective(model_config(), seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_adamw(params, config.optim)
    schedule = WarmupCosineSchedule(optimizer, config.optim, config.total_steps or 1)
    accum = config.accumulation_steps
    for step in range(config.max_steps or 0):
        began = time.perf_counter(), time.thread_time()
        for micro in range(accum):
            tensors = batches[step * accum + micro].tensors
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(tensors)
            (out.loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(params, config.optim.max_grad_norm or float("inf"))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        yield time.perf_counter() - began[0], time.thread_time() - began[1]


def bare_loop(
    batches: list[TrainBatch], config: TrainerConfig, precision: str
) -> list[tuple[float, float]]:
    """The plain PyTorch loop; returns (wall, CPU) seconds of each optimizer step."""
    return list(bare_steps(batches, config, precision))


class LockstepBare(TrainerHook):
    """Runs one bare-loop step right after each Trainer optimizer step (hooks run right after
    it), so the two loops alternate step by step under the same load.

    Records, per Trainer step, the process (wall, CPU) time from the end of the previous bare
    step to this boundary plus whatever other threads (the loader's prefetch thread) spent while
    the bare step ran; and per bare step its (wall, CPU) time on this thread.
    """

    def __init__(self, bare: Iterator[tuple[float, float]]) -> None:
        self._bare = bare
        self.trainer_steps: list[tuple[float, float]] = []
        self.bare_steps: list[tuple[float, float]] = []
        self._since: tuple[float, float] = _now()

    def on_fit_start(self, context: HookContext) -> None:
        self._since = _now()

    def on_optimizer_step(self, event: StepEvent) -> None:
        now = _now()
        self.trainer_steps.append((now[0] - self._since[0], now[1] - self._since[1]))
        wall, thread_cpu = next(self._bare)
        self.bare_steps.append((wall, thread_cpu))
        # Everything the process spent during the bare step but the bare step's own thread CPU
        # (the prefetch thread fetching ahead) is the Trainer's and counts to its next step.
        self._since = (now[0] + wall, now[1] + thread_cpu)


def lockstep_round(
    store, refs, batches, config: TrainerConfig, precision: str, batch_size: int, workdir: Path
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """One round: ``Trainer.fit`` with a bare step after each of its steps; returns the
    (wall, CPU) seconds of each Trainer step and of each bare step, in order."""
    loader = FeatureDataLoader(store, refs=refs, batch_size=batch_size, shuffle=False, prefetch=1)
    acked: list[int] = []
    lockstep = LockstepBare(bare_steps(batches, config, precision))
    trainer = Trainer(
        Eagle3Objective(model_config(), seed=1),
        loader,
        config,
        backend=LocalBackend(precision),
        hooks=[AckHook(lambda step, ids: acked.append(step)), lockstep],
        metrics=JsonlMetrics(workdir / f"metrics-{time.monotonic_ns()}.jsonl"),
    )
    trainer.fit()
    assert acked == list(range(1, (config.max_steps or 0) + 1))
    return lockstep.trainer_steps, lockstep.bare_steps


def pair_ratios(
    trainer: list[tuple[float, float]], bare: list[tuple[float, float]], kind: int
) -> list[float]:
    """Trainer step k over the mean of the bare steps on either side of it (k-1 before it, k
    after it), so a linear drift in load cancels; steps 0 and 1 (warm-up: Adam's state is
    allocated at the first step) are left out of both sides."""
    return [
        trainer[k][kind] / ((bare[k - 1][kind] + bare[k][kind]) / 2)
        for k in range(2, min(len(trainer), len(bare)))
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)"
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        help="also emit the results as JSON: to stdout, or to the given file",
    )
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be >= 3 (the first two steps of a round are warm-up)")
    if args.threads:
        torch.set_num_threads(args.threads)
    host_memory_retained = retain_freed_host_memory()

    per_step = args.batch_size * args.accumulation
    count = per_step * args.steps
    store = open_store("memory://bench", retain_on_release=True)
    refs = put_features(store, count, args.seq_len)
    batches = list(
        FeatureDataLoader(
            store, refs=refs, batch_size=args.batch_size, shuffle=False, reuse_buffers=False
        )
    )
    config = trainer_config(args.steps, args.accumulation)

    steps: dict[str, list[tuple[float, float]]] = {"bare": [], "runtime": []}
    paired: dict[str, list[float]] = {"wall": [], "cpu": []}
    loads = [load_1m()]
    with tempfile.TemporaryDirectory() as tmp:
        bare_loop(batches, trainer_config(1, args.accumulation), args.precision)  # warm-up
        for _ in range(args.rounds):
            runtime, bare = lockstep_round(
                store, refs, batches, config, args.precision, args.batch_size, Path(tmp)
            )
            steps["runtime"] += runtime[2:]
            steps["bare"] += bare[2:]
            for i, kind in enumerate(("wall", "cpu")):
                paired[kind] += pair_ratios(runtime, bare, i)
            loads.append(load_1m())
    stats = {
        side: {
            kind: {
                "median_s": statistics.median(v[i] for v in values),
                "min_s": min(v[i] for v in values),
                "max_s": max(v[i] for v in values),
            }
            for i, kind in enumerate(("wall", "cpu"))
        }
        for side, values in steps.items()
    }
    ratio_spread = {kind: spread(paired[kind]) for kind in ("wall", "cpu")}
    ratio = {kind: ratio_spread[kind]["median"] for kind in ("wall", "cpu")}
    result = {
        "benchmark": "bench-train",
        "method": "lockstep: one bare step after every Trainer step; ratio per Trainer step over "
        "the mean of the bare steps either side of it; median of those ratios",
        "precision": args.precision,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "measured_steps_per_side": len(steps["bare"]),
        "samples_per_step": per_step,
        "seq_len": args.seq_len,
        "torch_threads": torch.get_num_threads(),
        "host_memory_retained": host_memory_retained,
        "load_average_1m": loads[-1],
        "load": {"start": loads[0], "end": loads[-1], "min": min(loads), "max": max(loads)},
        "steps": steps,
        "round_ratios": paired,
        "ratio_spread": ratio_spread,
        "stats": stats,
        "cpu_overhead_ratio": ratio["cpu"],
        "wall_overhead_ratio": ratio["wall"],
        "max_ratio": MAX_RATIO,
        "passed": ratio["cpu"] <= MAX_RATIO,
    }
    print(
        f"bench-train  ({args.precision}, {per_step} samples x {args.seq_len} tokens per step, "
        f"{args.steps} steps x {args.rounds} rounds in lockstep, {torch.get_num_threads()} torch "
        f"thread(s), load average {loads[0]:.1f} -> {loads[-1]:.1f} "
        f"(min {min(loads):.1f}, max {max(loads):.1f}))"
    )
    print(f"{'loop':<18}{'clock':<7}{'median s/step':>14}{'min':>9}{'max':>9}{'steps':>7}")
    for name, side in (("bare PyTorch", "bare"), ("dataflow Trainer", "runtime")):
        for kind in ("cpu", "wall"):
            row = stats[side][kind]
            print(
                f"{name:<18}{kind:<7}{row['median_s']:>14.4f}{row['min_s']:>9.4f}"
                f"{row['max_s']:>9.4f}{len(steps[side]):>7}"
            )
    verdict = "PASS" if result["passed"] else "FAIL"
    print(
        describe("Trainer / bare, CPU s/step", ratio_spread["cpu"])
        + f"  (limit {MAX_RATIO}) {verdict}"
    )
    print(describe("Trainer / bare, wall s/step", ratio_spread["wall"]))
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
