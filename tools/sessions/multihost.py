"""The `multihost` gate: virtual hosts (network namespaces on one bridge) with real services."""

from __future__ import annotations

import nox
from tools.sessions._common import CONSTRAINTS, ROOT, install_editable

MULTIHOST_TESTS = ROOT / "tools" / "dataflow-testing" / "tests"


@nox.session
def multihost(session: nox.Session) -> None:
    """Virtual hosts on this machine: Redis + Mooncake master on one, clients on the others,
    and a real disaggregated run (producer on b, consumer on c, a consumer SIGKILL + resume);
    a consumer torchrun job over hosts c and d, the host of rank 1 SIGKILLed and the job resumed.

    Needs root (network namespaces). Where they cannot be used it prints `NOT RUN: <reason>` and
    ends as skipped, never as passed.
    """
    # launch brings store, control and train: test_multihost_run.py runs `dataflow-launch
    # produce` / `consume` on the virtual hosts with a Redis ledger and a mooncake:// store.
    install_editable(session, "launch", ("test", "hf", "redis", "mooncake-cpu"))
    session.install(*CONSTRAINTS, "redis>=5", "hiredis")
    check = session.run(
        "python", "-m", "dataflow_testing.netns", "check", silent=True, success_codes=[0, 3]
    )
    verdict = (
        (check or "").strip().splitlines()[-1]
        if check
        else "NOT RUN: capability check printed nothing"
    )
    print(verdict)
    if verdict.startswith("NOT RUN:"):
        session.skip(verdict)
    # Leftovers of an earlier run that was killed (its pid is gone) are removed first.
    session.run("python", "-m", "dataflow_testing.netns", "cleanup")
    session.run("pytest", str(MULTIHOST_TESTS), "-p", "no:cacheprovider", *session.posargs)
    session.run("python", "-m", "dataflow_testing.netns", "cleanup")
