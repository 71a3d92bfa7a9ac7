"""The `bench-store` session: every packages/dataflow-store/benchmarks/bench_*.py, in name order.

Executed inside noxfile.py's namespace (ROOT, install_editable, nox), hence the F821 waivers.
Arguments after `--` go to every script (e.g. `nox -s bench-store -- --json --repeat 30`).
"""

STORE_BENCHMARKS = ROOT / "packages" / "dataflow-store" / "benchmarks"  # noqa: F821


@nox.session(name="bench-store")  # noqa: F821
def bench_store(session: nox.Session) -> None:  # noqa: F821
    """Store throughput against baselines measured in the same run (shm, dir, mooncake, ...)."""
    install_editable(session, "store", ("mooncake-cpu",))  # noqa: F821
    scripts = sorted(STORE_BENCHMARKS.glob("bench_*.py"))
    if not scripts:
        session.error(f"no bench_*.py in {STORE_BENCHMARKS}")
    for script in scripts:
        session.log(f"== {script.name}")
        session.run("python", str(script), *session.posargs)
