"""A producer process for the cross-process tests: leases prompts, "rolls out", commits refs.

Run as ``python producer_process.py LEDGER_URI RUN_DIR RUN_ID WORKER PROMPTS [options]``.
Each rollout is logged (``rollouts.log``, one task id a line, fsynced) before its ref is
committed; prompt ``p<i>`` yields sample ``s<i>`` of ``--nbytes`` with a feature file under
``RUN_DIR/features``. A restarted producer reclaims its worker's leases and continues. With
``--fail-after N`` the producer marks the run FAILED after N commits and exits 3. With
``--high-refs``/``--max-bytes`` it applies flow control before every rollout and writes its
pause accounting to ``RUN_DIR/flow.json`` at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from control_fixtures import make_ref

from dataflow.contracts import PromptTask
from dataflow.control.controller import Controller
from dataflow.control.flow import FlowLimits


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    for name in ("uri", "run_dir", "run_id", "worker"):
        parser.add_argument(name)
    parser.add_argument("prompts", type=int)
    parser.add_argument("--fail-after", type=int)
    parser.add_argument("--high-refs", type=int)
    parser.add_argument("--low-refs", type=int)
    parser.add_argument("--max-bytes", type=int)
    parser.add_argument("--nbytes", type=int, default=100)
    parser.add_argument("--rollout-s", type=float, default=0.01)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    run_dir = Path(args.run_dir)
    limits = None
    if args.high_refs is not None:
        limits = FlowLimits(args.high_refs, args.low_refs, max_bytes=args.max_bytes)
    controller = Controller.open(args.uri)
    producer = controller.producer(flow_limits=limits)
    producer.open(args.run_id, resume=True)
    producer.reclaim(args.worker)
    producer.ingest([PromptTask(f"p{i}", {"input_ids": [i]}) for i in range(args.prompts)])
    commits = 0
    with open(run_dir / "rollouts.log", "a", encoding="utf-8") as log:
        log.write(f"start {os.getpid()}\n")
        while True:
            # capacity first, then the lease: a lease is never held while paused
            with producer.wait_for_capacity(args.nbytes, timeout=60):
                tasks = producer.lease(args.worker, 1, 30.0)
                for task in tasks:
                    log.write(f"{task.task_id}\n")
                    log.flush()
                    os.fsync(log.fileno())
                    time.sleep(args.rollout_s)
                    ref = make_ref(int(task.task_id[1:]), task=task.task_id, nbytes=args.nbytes)
                    (run_dir / "features" / ref.sample_id).touch()
                    producer.commit([ref])
                    commits += 1
            if args.fail_after is not None and commits >= args.fail_after:
                producer.fail(f"injected failure after {commits} commits")
                return 3
            if not tasks:
                if producer.prompts_drained():
                    producer.close()
                    break
                time.sleep(0.01)
    if producer.flow is not None:
        snapshot = dataclasses.asdict(producer.flow.snapshot())
        (run_dir / "flow.json").write_text(json.dumps(snapshot), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
