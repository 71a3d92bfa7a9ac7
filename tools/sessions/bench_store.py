"""The `bench-store` session: every packages/dataflow-store/benchmarks/bench_*.py, in name order.

Arguments after `--` go to every script (e.g. `nox -s bench-store -- --json --repeat 30`).
"""

from __future__ import annotations

import nox
from tools.sessions._common import ROOT, install_editable

STORE_BENCHMARKS = ROOT / "packages" / "dataflow-store" / "benchmarks"


@nox.session(name="bench-store")
def bench_store(session: nox.Session) -> None:
    """Store throughput against baselines measured in the same run (shm, dir, mooncake, ...)."""
    install_editable(session, "store", ("mooncake-cpu",))
    scripts = sorted(STORE_BENCHMARKS.glob("bench_*.py"))
    if not scripts:
        session.error(f"no bench_*.py in {STORE_BENCHMARKS}")
    for script in scripts:
        session.log(f"== {script.name}")
        session.run("python", str(script), *session.posargs)
