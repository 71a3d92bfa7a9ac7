"""The `bench-engines` session: capture cost of the vllm and hf target engines against each
engine's bare forward on the same prompts, in one run (tools/bench/bench_engines.py).

Its venv gets vLLM's CPU build like the `vllm` session (`install_vllm`); the benchmark starts a
real vLLM CPU server on loopback (about 1-2 minutes) and times a few paired rounds. Arguments
after `--` go to the script (e.g. `nox -s bench-engines -- --rounds 5 --json out.json`). Also
part of `nox -s bench`.
"""

from __future__ import annotations

import nox
from tools.sessions._common import ROOT
from tools.sessions._vllm_install import VLLM_ENV, install_vllm

ENGINES_BENCHMARK = ROOT / "tools" / "bench" / "bench_engines.py"


@nox.session(name="bench-engines", venv_backend="virtualenv")
def bench_engines(session: nox.Session) -> None:
    """The vllm capture vs a bare server call, producer vs bare forward per engine (<= 1.25x)."""
    install_vllm(session, ("hf",))
    session.run("python", str(ENGINES_BENCHMARK), *session.posargs, env=VLLM_ENV)
