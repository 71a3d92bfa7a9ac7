"""bench-train: the trainer runtime's step time against a bare PyTorch loop, measured in one run."""


@nox.session(name="bench-train")  # noqa: F821 - runs inside noxfile.py's namespace
def bench_train(session: nox.Session) -> None:  # noqa: F821
    """Overhead ratio of dataflow's Trainer over a bare loop (limit 1.05); posargs go to the script.

    ``nox -s bench-train -- --json bench-train.json`` also writes the results as JSON.
    """
    install_editable(session, "train")  # noqa: F821
    script = ROOT / "packages" / "dataflow-train" / "benchmarks" / "bench_train.py"  # noqa: F821
    session.run("python", str(script), *session.posargs)
