"""bench-plane: the colocated lightweight plane's cost against a bare PyTorch loop, one run."""

from __future__ import annotations

import nox
from tools.sessions._common import ROOT, install_editable


@nox.session(name="bench-plane")
def bench_plane(session: nox.Session) -> None:
    """Ratio of a bare loop fed through the local_colocated plane (memory:// ledger and store,
    dispatch, rank queue, loader, on_ack) over the same bare loop (limit 1.01); posargs go to
    the script (``-- --json bench-plane.json`` also writes JSON). Also part of ``nox -s bench``.
    """
    install_editable(session, "train")
    script = ROOT / "packages" / "dataflow-train" / "benchmarks" / "bench_plane.py"
    session.run("python", str(script), *session.posargs)
