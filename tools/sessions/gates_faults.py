"""The `faults` gate (CI variant) and `faults-long` (not run by CI).

The tests live in tests/gates/faults; each prints its line in the gate summary.
"""

from __future__ import annotations

import nox
from tools.sessions._common import ROOT, install_editable

GATE_TESTS = ROOT / "tests" / "gates"
GATE_EXTRAS = ("test", "hf", "plots", "redis")


def _run_gate(session, suite: str, variant: str) -> None:
    install_editable(session, "launch", GATE_EXTRAS)
    session.run(
        "pytest",
        str(GATE_TESTS / suite),
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env={"DATAFLOW_GATE_VARIANT": variant},
    )


@nox.session
def faults(session: nox.Session) -> None:
    """Fault gate, CI variant: 5 seeded SIGKILL runs (consumer, producer, both) of a real
    disaggregated online run with restarts, a full ledger disk (tmpfs; needs root, skipped
    with the reason otherwise), Redis restarted mid-run, torn/corrupt records, a producer
    failure that must not read as end of stream, a SIGKILL during a resharded (dp 2 -> 1)
    resume.
    """
    _run_gate(session, "faults", "ci")


@nox.session(name="faults-long")
def faults_long(session: nox.Session) -> None:
    """Fault gate, long variant (not in CI): 20 SIGKILL runs with up to three kills each;
    resharded resumes killed at both points, dp 2 -> 1 and 1 -> 2.
    """
    _run_gate(session, "faults", "long")
