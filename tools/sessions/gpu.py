"""The `gpu` session: ONE prepared script (tests/gates/gpu/session.py, at most 10 minutes on one
GPU, no downloads) — target built and saved, a real SGLang server pair, sglang vs hf features,
the trainer on NCCL in bf16 (samples/s, MFU), the exported draft served with EAGLE3 (acceptance
length) — printing one summary table. Where no CUDA: prints NOT RUN and is skipped.

Arguments after `--` run the pytest GPU matrix (tests/gates/gpu, marker gpu) after the script.
"""

from __future__ import annotations

import nox
from tools.sessions._common import ROOT, pkg_dir

GPU_TESTS = ROOT / "tests" / "gates" / "gpu"
GPU_CONSTRAINTS = GPU_TESTS / "constraints-gpu.txt"
NO_CUDA = "NOT RUN: no CUDA device (torch.cuda.is_available() is False)"


def _cuda_available() -> bool:
    """Whether this machine's torch sees a CUDA device (asked before installing anything)."""
    import shutil
    import subprocess
    import sys

    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode == 0:
        return probe.stdout.strip().endswith("True")
    # No torch beside nox: fall back to the driver's own listing.
    if shutil.which("nvidia-smi") is None:
        return False
    smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return smi.returncode == 0 and "GPU" in smi.stdout


@nox.session(venv_backend="virtualenv")
def gpu(session: nox.Session) -> None:
    """The one-script GPU check (see the module docstring). Elsewhere: prints NOT RUN, skipped."""
    if not _cuda_available():
        print(NO_CUDA)
        session.skip(NO_CUDA)
    session.install("-c", str(GPU_CONSTRAINTS), "torch", "numpy")
    session.install(
        "-c",
        str(GPU_CONSTRAINTS),
        "-e",
        str(ROOT / "tools" / "dataflow-testing"),
        *[arg for p in ("contracts", "store", "control", "train") for arg in ("-e", pkg_dir(p))],
        "-e",
        pkg_dir("launch") + "[test,hf,plots,sglang]",
    )
    session.run(
        "python", "-c", "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA'"
    )
    session.run("python", str(GPU_TESTS / "session.py"))
    if session.posargs:
        session.run(
            "pytest", str(GPU_TESTS), "-m", "gpu", "-rs", "-p", "no:cacheprovider", *session.posargs
        )
