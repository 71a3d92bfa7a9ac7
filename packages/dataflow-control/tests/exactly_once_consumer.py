"""A consumer process for the exactly-once tests: dp ranks as threads over one ledger.

Run as ``python exactly_once_consumer.py LEDGER_URI RUN_DIR RUN_ID DP BATCH [CKPT_EVERY [STEP_S]]``.
The "model" is a checkpoint file holding the last durable step; the audit trail is an
append-only ``trained.log`` of JSON lines: ``{"resume": C}`` when an attempt starts from
checkpoint C (what an auditor replays as "steps after C were undone"), and ``{"step": s, "ids":
[...]}`` after each acked optimizer step. Features are files under ``RUN_DIR/features`` (one per
sample); freeing a sample's features deletes its file. Exit 0 after the stream ended cleanly.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from dataflow_testing.thread_collective import ThreadCollective, run_ranks

from dataflow.control.controller import Controller
from dataflow.control.window import WindowShape


class FileFeatures:
    """SampleAborter over a directory of one file per sample."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def abort(self, sample_id: str, reason: str) -> None:
        (self.root / sample_id).unlink(missing_ok=True)


def append_line(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")
        log.flush()
        os.fsync(log.fileno())


def write_checkpoint(path: Path, step: int) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump({"step": step}, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: Path) -> int:
    if not path.exists():
        return -1
    return int(json.loads(path.read_text(encoding="utf-8"))["step"])


def main(argv: list[str]) -> int:
    uri, run_dir, run_id = argv[0], Path(argv[1]), argv[2]
    dp, batch = int(argv[3]), int(argv[4])
    ckpt_every = int(argv[5]) if len(argv) > 5 else 2
    step_s = float(argv[6]) if len(argv) > 6 else 0.005
    shape = WindowShape(dp_size=dp, batch_size=batch)
    ckpt, log = run_dir / "ckpt.json", run_dir / "trained.log"
    controller = Controller.open(uri, aborter=FileFeatures(run_dir / "features"))
    restored = read_checkpoint(ckpt)
    append_line(log, {"resume": restored, "pid": os.getpid(), "dp": dp})

    def rank_main(collective: ThreadCollective) -> int:
        side = controller.consumer(shape, rank=collective.rank, collective=collective)
        side.open(run_id, resume=True)
        side.reconcile(restored)
        queue, step, durable = side.queue(), restored + 1, restored
        while True:
            ids = []
            for _ in range(shape.per_rank):
                ref = queue.get(timeout=30)
                if ref is None:
                    break
                ids.append(ref.sample_id)
            if not ids:
                break
            if len(ids) != shape.per_rank:
                raise AssertionError(f"rank {collective.rank}: a window was cut short: {ids}")
            time.sleep(step_s)  # "training"
            result = side.ack(step, ids)
            if collective.rank == 0:
                append_line(log, {"step": step, "ids": list(result.all_ids)})
            if (step + 1) % ckpt_every == 0:
                if collective.rank == 0:
                    write_checkpoint(ckpt, step)
                side.checkpoint_durable(step)
                durable = step
            step += 1
        if step - 1 > durable:
            if collective.rank == 0:
                write_checkpoint(ckpt, step - 1)
            side.checkpoint_durable(step - 1)
        side.finish()
        return step

    outcomes = run_ranks(dp, rank_main, timeout_s=120)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        for failure in failures:
            print(f"{type(failure).__name__}: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
