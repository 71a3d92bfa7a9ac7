"""A producer process for the cross-process tests: leases prompts, "rolls out", commits refs.

Run as ``python producer_process.py LEDGER_URI RUN_DIR RUN_ID WORKER PROMPTS [FAIL_AFTER]``.
Each rollout is logged (``rollouts.log``, one task id a line, fsynced) before its ref is
committed; prompt ``p<i>`` yields sample ``s<i>`` with a feature file under ``RUN_DIR/features``.
A restarted producer reclaims its worker's leases and continues. With FAIL_AFTER the producer
marks the run FAILED after that many commits and exits 3.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from control_fixtures import make_ref

from dataflow.contracts import PromptTask
from dataflow.control.controller import Controller


def main(argv: list[str]) -> int:
    uri, run_dir, run_id, worker = argv[0], Path(argv[1]), argv[2], argv[3]
    prompts = int(argv[4])
    fail_after = int(argv[5]) if len(argv) > 5 else None
    producer = Controller.open(uri).producer()
    producer.open(run_id, resume=True)
    producer.reclaim(worker)
    producer.ingest([PromptTask(f"p{i}", {"input_ids": [i]}) for i in range(prompts)])
    commits = 0
    with open(run_dir / "rollouts.log", "a", encoding="utf-8") as log:
        log.write(f"start {os.getpid()}\n")
        while True:
            tasks = producer.lease(worker, 2, 30.0)
            if not tasks:
                if producer.prompts_drained():
                    producer.close()
                    return 0
                time.sleep(0.01)
                continue
            for task in tasks:
                log.write(f"{task.task_id}\n")
                log.flush()
                os.fsync(log.fileno())
                time.sleep(0.01)  # "rollout"
                index = int(task.task_id[1:])
                ref = make_ref(index, task=task.task_id)
                (run_dir / "features" / ref.sample_id).touch()
                producer.commit([ref])
                commits += 1
                if fail_after is not None and commits >= fail_after:
                    producer.fail(f"injected failure after {commits} commits")
                    return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
