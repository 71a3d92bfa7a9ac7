"""The `faults` gate (CI variant) and `faults-long` (not run by CI).

Executed inside noxfile.py's namespace (ROOT, CONSTRAINTS, install_editable, nox), hence the
F821 waivers. The tests live in tests/gates/faults; each prints its line in the gate summary.
"""

GATE_TESTS = ROOT / "tests" / "gates"  # noqa: F821
GATE_EXTRAS = ("test", "hf", "plots", "redis")


def _run_gate(session, suite: str, variant: str) -> None:
    install_editable(session, "launch", GATE_EXTRAS)  # noqa: F821
    session.run(
        "pytest",
        str(GATE_TESTS / suite),
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env={"DATAFLOW_GATE_VARIANT": variant},
    )


@nox.session  # noqa: F821
def faults(session: nox.Session) -> None:  # noqa: F821
    """Fault gate, CI variant: 5 seeded SIGKILL runs (consumer, producer, both) of a real
    disaggregated online run with restarts, a full ledger disk (tmpfs; needs root, skipped
    with the reason otherwise), Redis restarted mid-run, torn/corrupt records, a producer
    failure that must not read as end of stream.
    """
    _run_gate(session, "faults", "ci")


@nox.session(name="faults-long")  # noqa: F821
def faults_long(session: nox.Session) -> None:  # noqa: F821
    """Fault gate, long variant (not in CI): 20 SIGKILL runs with up to three kills each."""
    _run_gate(session, "faults", "long")
