"""The `bench-control` session: ledger throughput through the public API vs raw sqlite3.

Executed inside noxfile.py's namespace (ROOT, install_editable, nox), hence the F821 waivers.
Arguments after `--` go to the script (e.g. `nox -s bench-control -- --json --repeats 5`).
"""

CONTROL_BENCHMARK = ROOT / "packages" / "dataflow-control" / "benchmarks" / "bench_ledger.py"  # noqa: F821


@nox.session(name="bench-control")  # noqa: F821
def bench_control(session: nox.Session) -> None:  # noqa: F821
    """20k refs committed, dispatched, acked in windows of 64 on SQLite and Redis; status() growth.

    Needs `redis-server` on PATH (started on loopback for the run; `-- --no-redis` skips it).
    """
    install_editable(session, "control", ("redis",))  # noqa: F821
    session.run("python", str(CONTROL_BENCHMARK), *session.posargs)
