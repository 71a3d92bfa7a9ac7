"""The `bench` session: every benchmark (store, Mooncake, control, train, end-to-end) in one run,
written up in docs/benchmarks.md.

Arguments after `--` go to tools/bench/run_benchmarks.py (e.g. `-- --quick`).
"""

from __future__ import annotations

import nox
from tools.sessions._common import ROOT, install_editable

BENCH_RUNNER = ROOT / "tools" / "bench" / "run_benchmarks.py"


@nox.session
def bench(session: nox.Session) -> None:
    """Store, control, train and end-to-end benchmarks; writes docs/benchmarks.md.

    Needs `redis-server` on PATH (bench-control starts one on loopback) and the Mooncake wheel
    (its benchmark starts a `mooncake_master`). Takes about 15 minutes on 2 loaded cores.
    """
    install_editable(session, "launch", ("hf", "plots", "redis", "mooncake-cpu"))
    session.run("python", str(BENCH_RUNNER), *session.posargs)
