"""Run every benchmark with ``--json`` in one go and write ``docs/benchmarks.md`` from them.

Benchmarks: ``packages/*/benchmarks/bench_*.py`` (store, Mooncake, store hot paths, control,
train, loader, plane) and the end-to-end and engines ones here (``bench_e2e.py``;
``bench_engines.py`` starts a vLLM CPU server, run by ``$DATAFLOW_VLLM_PYTHON`` or this
interpreter). Each runs in its own process; its JSON is kept beside
the report's data (``--raw DIR``), its stderr shown on failure. A benchmark that crashes is
reported as such in the document (and makes this script exit 1); one that runs but misses its
target is reported as "not met" (exit 0: the numbers are the result).

    python tools/bench/run_benchmarks.py [--out docs/benchmarks.md] [--raw DIR] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from machine import Machine  # noqa: E402
from report import render  # noqa: E402


@dataclass
class Outcome:
    """One benchmark's run: its JSON result, or why there is none."""

    name: str
    command: list[str]
    seconds: float = 0.0
    result: dict[str, Any] | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _last_json_object(text: str) -> dict[str, Any]:
    """The last top-level JSON object printed in ``text`` (benchmarks may print lines before)."""
    decoder = json.JSONDecoder()
    found: dict[str, Any] | None = None
    index = text.find("{")
    while index != -1:
        try:
            obj, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            index = text.find("{", index + 1)
            continue
        if isinstance(obj, dict):
            found = obj
        index = text.find("{", end)
    if found is None:
        raise ValueError("no JSON object in the output")
    return found


def run(name: str, command: list[str], json_file: Path | None, raw: Path) -> Outcome:
    """Run ``command``; its JSON comes from ``json_file`` if given, else from its stdout."""
    print(f"== {name}: {' '.join(command)}", flush=True)
    shown = ["python", *(str(c).replace(f"{ROOT}/", "") for c in command[1:])]
    outcome = Outcome(name, shown)
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    outcome.seconds = time.perf_counter() - started
    (raw / f"{name}.stdout.txt").write_text(proc.stdout)
    (raw / f"{name}.stderr.txt").write_text(proc.stderr)
    try:
        text = json_file.read_text() if json_file is not None else proc.stdout
        outcome.result = _last_json_object(text)
        (raw / f"{name}.json").write_text(json.dumps(outcome.result, indent=2))
    except (OSError, ValueError) as exc:
        tail = (proc.stderr or proc.stdout)[-1500:]
        outcome.error = f"exit {proc.returncode}, {exc}: {tail}"
    print(
        f"   {'ok' if outcome.result is not None else 'FAILED'} in {outcome.seconds:.0f}s",
        flush=True,
    )
    if outcome.error:
        print(outcome.error, file=sys.stderr)
    return outcome


def main() -> int:
    """Run all benchmarks, write the report, print where it is."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--raw", type=Path, default=None, help="keep each benchmark's output here")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--e2e-steps", type=int, default=40)
    args = parser.parse_args()
    raw = args.raw or Path(tempfile.mkdtemp(prefix="dataflow-bench-"))
    raw.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    store_dir = ROOT / "packages" / "dataflow-store" / "benchmarks"
    repeat = ["--repeat", "5"] if args.quick else []
    started_at = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()
    outcomes = [
        run("store", [py, str(store_dir / "bench_store.py"), "--json", *repeat], None, raw),
        run("mooncake", [py, str(store_dir / "bench_mooncake.py"), "--json", *repeat], None, raw),
        run(
            "store-hot-paths",
            [py, str(store_dir / "bench_hot_paths.py"), "--json", *repeat],
            None,
            raw,
        ),
        run(
            "control",
            [
                py,
                str(ROOT / "packages" / "dataflow-control" / "benchmarks" / "bench_ledger.py"),
                "--json",
                *(["--repeats", "1"] if args.quick else []),
            ],
            None,
            raw,
        ),
        run(
            "train",
            [
                py,
                str(ROOT / "packages" / "dataflow-train" / "benchmarks" / "bench_train.py"),
                "--json",
                str(raw / "train.result.json"),
                *(["--rounds", "4"] if args.quick else []),
            ],
            raw / "train.result.json",
            raw,
        ),
        run(
            "loader",
            [
                py,
                str(ROOT / "packages" / "dataflow-train" / "benchmarks" / "bench_loader.py"),
                "--json",
                str(raw / "loader.result.json"),
                *(["--rounds", "3"] if args.quick else []),
            ],
            raw / "loader.result.json",
            raw,
        ),
        run(
            "plane",
            [
                py,
                str(ROOT / "packages" / "dataflow-train" / "benchmarks" / "bench_plane.py"),
                "--json",
                str(raw / "plane.result.json"),
                *(["--rounds", "4"] if args.quick else []),
            ],
            raw / "plane.result.json",
            raw,
        ),
        run(
            "e2e",
            [
                py,
                str(HERE / "bench_e2e.py"),
                "--steps",
                str(10 if args.quick else args.e2e_steps),
                "--json",
                str(raw / "e2e.result.json"),
            ],
            raw / "e2e.result.json",
            raw,
        ),
        run(
            "engines",
            [
                py,
                str(HERE / "bench_engines.py"),
                "--json",
                str(raw / "engines.result.json"),
                *(["--rounds", "2", "--prompts", "8"] if args.quick else []),
            ],
            raw / "engines.result.json",
            raw,
        ),
    ]
    finished_at = dt.datetime.now(dt.UTC)
    document = render(
        outcomes,
        Machine.here(),
        started_at,
        finished_at,
        (load_start[0], os.getloadavg()[0]),
        quick=args.quick,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(document)
    print(f"wrote {args.out} (raw outputs in {raw})")
    print(document.split("## Details")[0])
    return 0 if all(o.result is not None for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
