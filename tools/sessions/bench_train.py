"""bench-train: the trainer runtime's step time against a bare PyTorch loop, measured in one run."""

from __future__ import annotations

import nox
from tools.sessions._common import ROOT, install_editable


@nox.session(name="bench-train")
def bench_train(session: nox.Session) -> None:
    """Overhead ratio of dataflow's Trainer over a bare loop (limit 1.05); posargs go to the script.

    ``nox -s bench-train -- --json bench-train.json`` also writes the results as JSON.
    """
    install_editable(session, "train")
    script = ROOT / "packages" / "dataflow-train" / "benchmarks" / "bench_train.py"
    session.run("python", str(script), *session.posargs)
