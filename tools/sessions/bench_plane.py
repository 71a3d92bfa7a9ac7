"""bench-plane: the colocated lightweight plane's cost against a bare PyTorch loop, one run."""


@nox.session(name="bench-plane")  # noqa: F821 - runs inside noxfile.py's namespace
def bench_plane(session: nox.Session) -> None:  # noqa: F821
    """Ratio of a bare loop fed through the local_colocated plane (memory:// ledger and store,
    dispatch, rank queue, loader, on_ack) over the same bare loop (limit 1.01); posargs go to
    the script (``-- --json bench-plane.json`` also writes JSON). Also part of ``nox -s bench``.
    """
    install_editable(session, "train")  # noqa: F821
    script = ROOT / "packages" / "dataflow-train" / "benchmarks" / "bench_plane.py"  # noqa: F821
    session.run("python", str(script), *session.posargs)
