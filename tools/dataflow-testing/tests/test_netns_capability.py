"""netns_available / multihost_available and the module's command line report exact reasons."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from dataflow_testing import netns
from dataflow_testing.netns import DEFAULT_PREFIX, main, netns_available
from netns_support import NETNS_OK, namespaces, own_namespaces

CHECK = "from dataflow_testing.netns import netns_available as f; ok, why = f(); print(ok, why)"


def test_available_here_or_says_why() -> None:
    ok, reason = netns_available()
    assert ok is NETNS_OK
    assert reason
    if ok:
        assert "iproute2" in reason
    # The probe namespace is always removed.
    assert not {n for n in namespaces() if n.startswith(f"{DEFAULT_PREFIX}-{os.getpid()}-")}


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping root needs root")
def test_not_root_is_reported() -> None:
    # The module runs as a plain script (stdlib only): an unprivileged user may not be able to
    # read the editable install's path configuration.
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, netns.__file__, "check"],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.startswith("NOT RUN: needs root (running as uid 65534)")


def test_missing_ip_command_is_reported() -> None:
    env = {**os.environ, "PATH": "/nonexistent"}
    proc = subprocess.run(
        [sys.executable, "-c", CHECK],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=True,
    )
    expected = "the `ip` command (iproute2) is not on PATH" if os.geteuid() == 0 else "needs root"
    assert proc.stdout.startswith("False ")
    assert expected in proc.stdout


def test_check_command_prints_not_run_with_reason_and_exit_code() -> None:
    env = {**os.environ, "PATH": "/nonexistent"}
    proc = subprocess.run(
        [sys.executable, "-m", "dataflow_testing.netns", "check"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert proc.returncode == 3
    assert proc.stdout.startswith("NOT RUN: ")


def test_check_command_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "usage:" in capsys.readouterr().err


def test_cleanup_command_refuses_a_bad_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    before = own_namespaces()
    assert main(["cleanup", "Bad-Prefix"]) == 2
    assert "prefix must be 1-12 lowercase letters/digits" in capsys.readouterr().err
    assert own_namespaces() == before
