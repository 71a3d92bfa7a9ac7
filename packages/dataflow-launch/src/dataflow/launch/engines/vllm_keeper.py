"""``python -m dataflow.launch.engines.vllm_keeper PARENT_PID -- COMMAND...``: runs a managed
vLLM server so that it never outlives the producer that started it.

The keeper leads its own process group (the producer starts it with a new session) and starts
``COMMAND`` in that group; vLLM's engine processes inherit it. It stops the whole group —
``SIGTERM``, then ``SIGKILL`` after a grace period — when the producer is gone (its parent pid
changes or ``PARENT_PID`` is dead; the kernel also sends ``SIGTERM`` on parent death through
``PR_SET_PDEATHSIG``), when it receives ``SIGTERM``/``SIGINT`` itself, or when the server exits
(stray engine processes go with it). It exits with the server's exit status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

from dataflow.contracts.processes import pid_alive

GRACE_S = 10.0
WATCH_S = 0.2


def _set_parent_death_signal(signum: int) -> None:
    """``PR_SET_PDEATHSIG`` (Linux; elsewhere the parent-pid watch alone stops the server)."""
    import ctypes
    import ctypes.util

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl(1, signum, 0, 0, 0)


def _stop_group(server: subprocess.Popen[bytes]) -> None:
    group = os.getpgid(0)
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        _kill_others(group, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_has_others(group):
            time.sleep(0.05)
            server.poll()


def _members(group: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _group_has_others(group: int) -> bool:
    return bool(_members(group))


def _kill_others(group: int, sig: int) -> None:
    for pid in _members(group):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def main(argv: list[str]) -> int:
    """Run the server of ``argv`` (``PARENT_PID -- COMMAND...``) until it or the parent ends."""
    if len(argv) < 3 or argv[1] != "--":
        print("usage: vllm_keeper PARENT_PID -- COMMAND...", file=sys.stderr)
        return 2
    parent_pid, command = int(argv[0]), argv[2:]
    parent = os.getppid()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    _set_parent_death_signal(signal.SIGTERM)
    server = subprocess.Popen(command)
    while not stop.wait(WATCH_S):
        if server.poll() is not None:
            break
        if os.getppid() != parent or not pid_alive(parent_pid):
            break
    _stop_group(server)
    code = server.wait()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
