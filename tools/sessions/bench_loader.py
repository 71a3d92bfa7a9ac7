"""bench-loader: FeatureDataLoader's cost per sample beyond a bare stack loop, one run."""

from __future__ import annotations

import nox
from tools.sessions._common import ROOT, install_editable


@nox.session(name="bench-loader")
def bench_loader(session: nox.Session) -> None:
    """Loader overhead per sample (refs and queue modes, batch 1 and 8, prefetch 0 and 2) over a
    bare loop concatenating the same tensors (target <= 20 us); posargs go to the script
    (``-- --json bench-loader.json`` also writes JSON). Also part of ``nox -s bench``.
    """
    install_editable(session, "train")
    script = ROOT / "packages" / "dataflow-train" / "benchmarks" / "bench_loader.py"
    session.run("python", str(script), *session.posargs)
