"""The `soak` gate (CI variant) and `soak-long` (not run by CI).

The tests live in tests/gates/soak; each prints its line in the gate summary.
"""

from __future__ import annotations

import nox
from tools.sessions._common import ROOT, install_editable

SOAK_TESTS = ROOT / "tests" / "gates" / "soak"


def _run_soak(session, variant: str) -> None:
    install_editable(session, "launch", ("test", "hf", "plots"))
    session.run(
        "pytest",
        str(SOAK_TESTS),
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env={"DATAFLOW_GATE_VARIANT": variant},
    )


@nox.session
def soak(session: nox.Session) -> None:
    """Soak gate, CI variant: a producer at least 4x faster than the trainer stays under the
    byte cap (ledger in-flight bytes and /dev/shm resident bytes sampled every 20 ms) and
    pauses; a trainer lagging at least 5x drains back to zero resident features.
    """
    _run_soak(session, "ci")


@nox.session(name="soak-long")
def soak_long(session: nox.Session) -> None:
    """Soak gate, long variant (not in CI): 200 samples at 4x, then 800 samples (two passes of
    the 400 demo prompts) with a 5x lagging trainer.
    """
    _run_soak(session, "long")
