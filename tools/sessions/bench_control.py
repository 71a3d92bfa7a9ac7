"""The `bench-control` session: ledger throughput through the public API vs raw sqlite3.

Arguments after `--` go to the script (e.g. `nox -s bench-control -- --json --repeats 5`).
"""

from __future__ import annotations

import nox
from tools.sessions._common import ROOT, install_editable

CONTROL_BENCHMARK = ROOT / "packages" / "dataflow-control" / "benchmarks" / "bench_ledger.py"


@nox.session(name="bench-control")
def bench_control(session: nox.Session) -> None:
    """20k refs committed, dispatched, acked in windows of 64 on SQLite and Redis; status() growth.

    Needs `redis-server` on PATH (started on loopback for the run; `-- --no-redis` skips it).
    """
    install_editable(session, "control", ("redis",))
    session.run("python", str(CONTROL_BENCHMARK), *session.posargs)
