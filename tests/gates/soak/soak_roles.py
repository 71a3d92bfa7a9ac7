"""The two roles of a soak run, as real processes: `python soak_roles.py produce|consume ...`.

Both are assembled from the launch package's public builders, exactly as `dataflow-launch
produce` / `consume` assemble them, with two additions a soak needs:
- produce: after the run, one JSON line `SOAK_FLOW {...}` with the producer's flow-control
  accounting (pauses, paused seconds, byte-cap refusals) and its timing;
- consume: the real trainer with a fixed delay injected before each optimizer step's ack (the
  trainer "lags" by that much per step), then `SOAK_TRAIN {...}` with its timing.

Arguments: ROLE CONFIG [--set k=v ...] [--step-delay SECONDS].
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from dataflow.control import ConsumerSide, Controller, DistAckResult, WindowShape
from dataflow.launch.builders.common import open_plan_ledger, open_run_store, trainer_objective
from dataflow.launch.builders.online import start_producer
from dataflow.launch.builders.ranks import rank_layout
from dataflow.launch.builders.roles import control_plan
from dataflow.launch.builders.trainer_path import RefSource, train_draft
from dataflow.launch.config import LaunchConfig, load_config
from dataflow.launch.run_dir import RunDir


class LaggingAck:
    """The consumer side's ack, after sleeping ``delay_s``: a trainer that is that much slower
    per step.
    """

    def __init__(self, delay_s: float, side: ConsumerSide) -> None:
        self._delay_s = delay_s
        self._side = side

    def __call__(self, step: int, sample_ids: Sequence[str]) -> DistAckResult:
        time.sleep(self._delay_s)
        return self._side.ack(step, sample_ids)


def produce(config: LaunchConfig) -> None:
    plan = control_plan(config, leases_prompts=True)
    ledger = open_plan_ledger(config, plan)
    store = open_run_store(config)
    try:
        online = start_producer(config, ledger, store)
        try:
            report = online.producer.run()
        finally:
            online.close()
        flow = online.producer.side.flow
        assert flow is not None, "the soak needs flow control"
        snap = flow.snapshot()
        # paused_s sums every worker's waits; what is left of the workers' time is capture,
        # put and commit, so this is the rate the producer reaches when nothing holds it back.
        workers = len(report.workers)
        busy = max(report.seconds * workers - snap.paused_s, 1e-9) / workers
        print(
            "SOAK_FLOW "
            + json.dumps(
                {
                    "outcome": report.outcome,
                    "committed": report.committed,
                    "seconds": report.seconds,
                    "workers": workers,
                    "pauses": snap.pauses,
                    "paused_s": snap.paused_s,
                    "max_pause_s": snap.max_pause_s,
                    "refusals": snap.refusals,
                    "unthrottled_samples_per_s": report.committed / busy,
                }
            ),
            flush=True,
        )
    finally:
        store.close()
        ledger.close()


def consume(config: LaunchConfig, delay_s: float) -> None:
    plan = control_plan(config, leases_prompts=False)
    layout = rank_layout(config)
    run_dir = RunDir(Path(config.run.out_dir)).create()
    ledger = open_plan_ledger(config, plan)
    store = open_run_store(config)
    try:
        t = config.trainer
        shape = WindowShape(layout.world_size, t.batch_size, t.accumulation_steps)
        side = Controller(ledger, aborter=store).consumer(
            shape, rank=layout.rank, collective=layout.collective, release=plan.release
        )
        side.open(config.run.id, resume=True)
        ack = LaggingAck(delay_s, side)
        objective = trainer_objective(config)
        started = time.monotonic()
        try:
            outcome = train_draft(
                config,
                run_dir,
                objective,
                store,
                RefSource(queue=side.queue()),
                ack,
                layout,
                durable=side.checkpoint_durable if plan.tracks_checkpoints else None,
                resume=False,
                progress=False,
            )
        except BaseException as exc:
            side.fail(f"{type(exc).__name__}: {exc}"[:500])
            raise
        side.finish()
        seconds = time.monotonic() - started
        print(
            "SOAK_TRAIN "
            + json.dumps(
                {
                    "steps": outcome.steps,
                    "samples": outcome.samples,
                    "seconds": seconds,
                    "samples_per_s": outcome.samples / max(seconds, 1e-9),
                }
            ),
            flush=True,
        )
    finally:
        store.close()
        ledger.close()
        layout.close(True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("produce", "consume"))
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    config = load_config(Path(args.config), list(args.overrides))
    if args.role == "produce":
        produce(config)
    else:
        consume(config, args.step_delay)


if __name__ == "__main__":
    main()
