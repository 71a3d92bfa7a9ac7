"""End-to-end benchmark: the demo's workload with producer and trainer interleaved vs drained
then fitted, in the same run.

Workload: `dataflow-launch demo`'s config (built-in target on the hf engine, disaggregated
online, SQLite ledger, `shm://` store) for `--steps` optimizer steps, with the flow watermarks
raised to the whole run's samples so the producer can also run alone to the end (the only
change). Each role is a real process running the launch builders (`produce_online`,
`consume_online`); a role's time is its builder call, from after its imports to its return.

- drain-then-fit: the producer runs alone to the end, then the trainer alone:
  total = T_produce + T_train; the slower stage alone = max(T_produce, T_train);
- interleaved: both processes start together: total = last end - first start.

Reported: both wall times, the overlap ratio (interleaved total / slower stage alone; target
<= 1.15) and the trainer's idle fraction (sum of `data_wait_s` / sum of `step_time_s` from its
metrics.jsonl) in each mode.

Placement: in production each role has its own device (the target on inference GPUs, the draft
on training GPUs), so the ratio is meant to show what the runtime costs when the stages overlap,
not how two CPU-bound stages share one CPU. The headline figures therefore pin each role to its
own core (producer: CPU 0, trainer: CPU 1, in both modes, one torch thread each), which needs
>= 2 cores; the same measurement with both roles free to use every core ("shared") is reported
next to it.

    python bench_e2e.py [--steps 40] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

OVERLAP_TARGET = 1.15


ROLE_CPU = {"produce": 0, "consume": 1}


def role_main(role: str, config_path: str, times_path: str, pinned: bool) -> None:
    """Child process: run one role of the run in ``config_path``; write its start/end."""
    if pinned:  # before torch starts any thread: they all inherit the mask
        os.sched_setaffinity(0, {ROLE_CPU[role]})
    from dataflow.launch.builders.online import consume_online, produce_online
    from dataflow.launch.config import load_config
    from dataflow.launch.run_dir import RunDir

    config = load_config(Path(config_path), [])
    run_dir = RunDir(Path(config.run.out_dir)).create()
    start = time.time()
    if role == "produce":
        produce_online(config, run_dir, progress=False)
    else:
        run_dir.write_config(config)
        consume_online(config, run_dir, resume=False, progress=False)
    end = time.time()
    Path(times_path).write_text(json.dumps({"start": start, "end": end}))


def settings(out: Path, steps: int) -> dict[str, Any]:
    """The demo's config for ``steps`` steps into ``out``, watermarks raised to the whole run."""
    from dataflow.launch.cli.demo import demo_settings

    data = demo_settings(out, steps)
    total = data["trainer"]["total_steps"] * data["trainer"]["batch_size"]
    data["flow"] = {"high_watermark": total + 8, "low_watermark": total}
    data["store"]["uri"] = f"shm://bench-e2e-{uuid.uuid4().hex[:8]}"
    return data


def _spawn(role: str, config: Path, times: Path, pinned: bool) -> subprocess.Popen[bytes]:
    log = (config.parent / f"{role}.log").open("wb")
    placement = "pinned" if pinned else "shared"
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, str(config), str(times), placement],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )


def _wait(procs: dict[str, subprocess.Popen[bytes]], config: Path) -> None:
    for role, proc in procs.items():
        if proc.wait(timeout=1800) != 0:
            log = (config.parent / f"{role}.log").read_text(errors="replace")
            raise SystemExit(f"{role} failed (exit {proc.returncode}):\n{log[-3000:]}")


def _idle_fraction(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    waited = sum(r["data_wait_s"] for r in rows)
    stepped = sum(r["step_time_s"] for r in rows)
    return waited / stepped if stepped > 0 else 0.0


def measure(mode: str, work: Path, steps: int, pinned: bool) -> dict[str, Any]:
    """One run of ``mode`` ("drain_then_fit" or "interleaved") in its own directory."""
    run = work / f"{mode}-{'pinned' if pinned else 'shared'}"
    run.mkdir()
    config = run / "config.yaml"
    config.write_text(yaml.safe_dump(settings(run, steps), sort_keys=False))
    times = {role: run / f"{role}.times.json" for role in ("produce", "consume")}
    if mode == "drain_then_fit":
        _wait({"produce": _spawn("produce", config, times["produce"], pinned)}, config)
        _wait({"consume": _spawn("consume", config, times["consume"], pinned)}, config)
    else:
        procs = {role: _spawn(role, config, times[role], pinned) for role in ("produce", "consume")}
        _wait(procs, config)
    spans = {role: json.loads(path.read_text()) for role, path in times.items()}
    stage = {role: s["end"] - s["start"] for role, s in spans.items()}
    if mode == "drain_then_fit":
        total = stage["produce"] + stage["consume"]
    else:
        total = max(s["end"] for s in spans.values()) - min(s["start"] for s in spans.values())
    trainer = json.loads((run / "trainer.json").read_text())
    return {
        "wall_s": total,
        "produce_s": stage["produce"],
        "train_s": stage["consume"],
        "trainer_idle_fraction": _idle_fraction(run),
        "steps": trainer["steps"],
        "samples": trainer["samples"],
    }


def main() -> None:
    """Measure both modes (or run one role, in a child) and report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--json", nargs="?", const="-", help="JSON to stdout or to PATH")
    parser.add_argument(
        "--role", nargs=4, metavar=("ROLE", "CONFIG", "TIMES", "PLACEMENT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.role:
        role, config, times, placement = args.role
        role_main(role, config, times, placement == "pinned")
        return
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        raise SystemExit(f"bench_e2e needs >= 2 CPU cores to give each role its own; have {cores}")
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        work = Path(tmp)
        load_before = os.getloadavg()[0]
        pinned = _compare(work, args.steps, pinned=True)
        shared = _compare(work, args.steps, pinned=False)
        load_after = os.getloadavg()[0]
    result = {
        "benchmark": "e2e",
        "steps": args.steps,
        "placement": "one core per role (producer CPU 0, trainer CPU 1)",
        **pinned,
        "overlap_target": OVERLAP_TARGET,
        "overlap_met": pinned["overlap_ratio"] <= OVERLAP_TARGET,
        "shared": shared,
        "load_average_1m": {"start": load_before, "end": load_after},
    }
    out = sys.stderr if args.json == "-" else sys.stdout
    print(
        f"demo workload, {args.steps} steps ({pinned['interleaved']['samples']} samples)", file=out
    )
    for name, figures in (("one core per role", pinned), ("shared cores", shared)):
        drain, inter = figures["drain_then_fit"], figures["interleaved"]
        print(
            f"[{name}]\n"
            f"  drain-then-fit: produce {drain['produce_s']:.1f}s + train {drain['train_s']:.1f}s"
            f" = {drain['wall_s']:.1f}s (trainer idle {drain['trainer_idle_fraction']:.1%})\n"
            f"  interleaved:    {inter['wall_s']:.1f}s (produce {inter['produce_s']:.1f}s, train "
            f"{inter['train_s']:.1f}s; trainer idle {inter['trainer_idle_fraction']:.1%})\n"
            f"  overlap ratio {figures['overlap_ratio']:.2f}x the slower stage alone; "
            f"{figures['speedup_vs_drain_then_fit']:.2f}x faster than drain-then-fit",
            file=out,
        )
    verdict = "met" if result["overlap_met"] else "NOT met"
    print(f"target <= {OVERLAP_TARGET}x (one core per role): {verdict}", file=out)
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def _compare(work: Path, steps: int, *, pinned: bool) -> dict[str, Any]:
    """Drain-then-fit, then interleaved, with one placement; the ratios between them."""
    drain = measure("drain_then_fit", work, steps, pinned)
    inter = measure("interleaved", work, steps, pinned)
    slower = max(drain["produce_s"], drain["train_s"])
    return {
        "drain_then_fit": drain,
        "interleaved": inter,
        "slower_stage_alone_s": slower,
        "overlap_ratio": inter["wall_s"] / slower,
        "speedup_vs_drain_then_fit": drain["wall_s"] / inter["wall_s"],
    }


if __name__ == "__main__":
    main()
