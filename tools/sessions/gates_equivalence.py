"""The `equivalence` gates: one seed, one dataset, the same loss curve on every path.

Arguments after `--` go to pytest.
"""

from __future__ import annotations

import nox
from tools.sessions._common import ROOT, install_editable

EQUIVALENCE_TESTS = ROOT / "tests" / "gates" / "equivalence"


def _equivalence(session: nox.Session, prompts: int) -> None:
    install_editable(session, "launch", ("test", "hf", "plots", "mooncake-cpu"))
    session.run(
        "pytest",
        str(EQUIVALENCE_TESTS),
        "-p",
        "no:cacheprovider",
        *session.posargs,
        # CPU gates: hide GPUs so torchrun ranks take gloo (the GPU variant is `nox -s gpu`).
        env={
            "EQUIVALENCE_PROMPTS": str(prompts),
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
        },
    )


@nox.session
def equivalence(session: nox.Session) -> None:
    """CI variant (8 prompts, 4 optimizer steps per path; 2-5 minutes on 2 cores).

    Bit-identical per-step losses through colocated offline (file://), disaggregated offline
    (dir://, mooncake:// with a real master), colocated online (memory://) and disaggregated
    online (SQLite + shm://); 1 vs 2 FSDP2 ranks and 1 vs dp2 x sp2 ranks within stated
    tolerances, loss and global gradient norm. Prints a summary table.
    """
    _equivalence(session, prompts=8)


@nox.session(name="equivalence-long")
def equivalence_long(session: nox.Session) -> None:
    """The same gates over 96 prompts (48 optimizer steps per path); not run by CI."""
    _equivalence(session, prompts=96)
