"""``python -m dataflow.launch.engines.vllm_keeper PARENT_PID -- COMMAND...``: runs a managed
vLLM server so that it never outlives the producer that started it.

The keeper leads its own process group (the producer starts it with a new session) and starts
``COMMAND`` in that group; vLLM's engine processes inherit it. It stops the whole group —
``SIGTERM``, then ``SIGKILL`` after a grace period — when the producer is gone (its parent pid
changes or ``PARENT_PID`` is dead; the kernel also sends ``SIGTERM`` on parent death through
``PR_SET_PDEATHSIG``), when it receives ``SIGTERM``/``SIGINT`` itself, or when the server exits
(stray engine processes go with it). It exits with the server's exit status.

Shared memory: a SIGKILLed vLLM leaves its ``/dev/shm`` segments behind (torch's ``psm_*``,
multiprocessing's ``sem.mp-*``, vLLM's message queues — hundreds of MB per server). The keeper
records every ``/dev/shm`` entry a member of its group maps or holds open (scanned every
``SHM_SCAN_S`` and once more before stopping the group) and, once the group is gone, unlinks
those still present that no other live process maps or holds open. Entries the server tree never
touched (another program's) are never removed. With ``DATAFLOW_KEEPER_SHM_RECORD=PATH`` in its
environment the keeper also appends each name it records to ``PATH``, so that whoever started
it can sweep them (:func:`sweep_recorded`) when the keeper itself was SIGKILLed with its group.
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
SHM_ROOT = "/dev/shm"
SHM_SCAN_S = 1.0
RECORD_ENV = "DATAFLOW_KEEPER_SHM_RECORD"


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


def _shm_in_use(pid: int, root: str = SHM_ROOT) -> set[str]:
    """Names of the ``root`` entries process ``pid`` maps or holds open (empty if it is gone)."""
    prefix = root.rstrip("/") + "/"
    found: set[str] = set()
    with (
        contextlib.suppress(OSError),
        open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as handle,
    ):
        for line in handle:
            at = line.find(prefix)
            if at >= 0:
                found.add(line[at + len(prefix) :].strip().removesuffix(" (deleted)"))
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(prefix):
                    found.add(target[len(prefix) :].removesuffix(" (deleted)"))
    # dfs~ names are the feature store's own (a store-mode server writes them): its owner rules
    # reclaim them, never this sweep.
    return {name for name in found if name and "/" not in name and not name.startswith("dfs~")}


class ShmLedger:
    """The ``/dev/shm`` entries a process group used: recorded while it runs, swept after."""

    def __init__(self, root: str = SHM_ROOT, record: str | None = None) -> None:
        self.root = root
        self.record = record
        self.seen: set[str] = set()

    def scan(self, group: int) -> None:
        """Record what every live member of ``group`` maps or holds open now."""
        new: set[str] = set()
        for pid in _members(group):
            new |= _shm_in_use(pid, self.root) - self.seen
        self.seen |= new
        if new and self.record:
            with contextlib.suppress(OSError), open(self.record, "a", encoding="utf-8") as out:
                out.write("".join(f"{name}\n" for name in sorted(new)))

    def sweep(self) -> list[str]:
        """Unlink the recorded entries that still exist and no live process uses; return them."""
        present = {n for n in self.seen if os.path.lexists(os.path.join(self.root, n))}
        if not present:
            return []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                present -= _shm_in_use(int(entry), self.root)
        removed = []
        for name in sorted(present):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.root, name))
                removed.append(name)
        return removed


def sweep_recorded(record: str, root: str = SHM_ROOT) -> list[str]:
    """Sweep the names a keeper recorded in ``record`` (see :class:`ShmLedger`); call it once
    the keeper's group is gone. A missing record sweeps nothing.
    """
    ledger = ShmLedger(root)
    with contextlib.suppress(FileNotFoundError), open(record, encoding="utf-8") as handle:
        ledger.seen = {line.strip() for line in handle if line.strip()}
    return [n for n in ledger.sweep() if "/" not in n]


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
    shm = ShmLedger(record=os.environ.get(RECORD_ENV) or None)
    group = os.getpgid(0)
    next_scan = 0.0
    while not stop.wait(WATCH_S):
        if time.monotonic() >= next_scan:
            shm.scan(group)
            next_scan = time.monotonic() + SHM_SCAN_S
        if server.poll() is not None:
            break
        if os.getppid() != parent or not pid_alive(parent_pid):
            break
    shm.scan(group)
    _stop_group(server)
    code = server.wait()
    shm.sweep()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
