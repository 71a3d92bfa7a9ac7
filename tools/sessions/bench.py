"""The `bench` session: every benchmark (store, Mooncake, control, train, end-to-end) in one run,
written up in docs/benchmarks.md.

Executed inside noxfile.py's namespace (ROOT, CONSTRAINTS, install_editable, nox), hence the
F821 waivers. Arguments after `--` go to tools/bench/run_benchmarks.py (e.g. `-- --quick`).
"""

BENCH_RUNNER = ROOT / "tools" / "bench" / "run_benchmarks.py"  # noqa: F821


@nox.session  # noqa: F821
def bench(session: nox.Session) -> None:  # noqa: F821
    """Store, control, train and end-to-end benchmarks; writes docs/benchmarks.md.

    Needs `redis-server` on PATH (bench-control starts one on loopback) and the Mooncake wheel
    (its benchmark starts a `mooncake_master`). Takes about 15 minutes on 2 loaded cores.
    """
    install_editable(session, "launch", ("hf", "plots", "redis", "mooncake-cpu"))  # noqa: F821
    session.run("python", str(BENCH_RUNNER), *session.posargs)
