"""The `bench` session: every benchmark (store, Mooncake, control, train, plane, end-to-end,
engines) in one run, written up in docs/benchmarks.md.

Its venv gets vLLM's CPU build like the `vllm` session (`install_vllm`): the engines benchmark
starts a real vLLM CPU server.

Arguments after `--` go to tools/bench/run_benchmarks.py (e.g. `-- --quick`).
"""

from __future__ import annotations

import nox
from tools.sessions._common import ROOT
from tools.sessions._vllm_install import VLLM_ENV, install_vllm

BENCH_RUNNER = ROOT / "tools" / "bench" / "run_benchmarks.py"


@nox.session
def bench(session: nox.Session) -> None:
    """Store, control, train, end-to-end and engines benchmarks; writes docs/benchmarks.md.

    Needs `redis-server` on PATH (bench-control starts one on loopback) and the Mooncake wheel
    (its benchmark starts a `mooncake_master`). Takes about 20 minutes on 2 loaded cores
    (the engines benchmark: a few of them, most of it the vLLM server's start).
    """
    install_vllm(session, ("hf", "plots", "redis", "mooncake-cpu"))
    session.run("python", str(BENCH_RUNNER), *session.posargs, env=VLLM_ENV)
