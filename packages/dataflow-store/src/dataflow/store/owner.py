"""Who owns a segment: a process identity that survives pid reuse (pid + kernel start time).

Guarantees: :func:`current_owner` is stable for the life of this process;
:func:`owner_alive` is False once that exact process is gone, even if its pid was reused.
"""

from __future__ import annotations

import os

DETACHED = "0000000000.00000000000000000000"
"""Owner of a segment whose producer closed cleanly: it lives until released or aborted."""


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22 (starttime) counted after the command name, which may itself contain spaces.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


def owner_of(pid: int) -> str | None:
    """The identity of process ``pid`` as a fixed-width string, or None if it is not running."""
    start = _start_time(pid)
    return None if start is None else f"{pid:010d}.{start:020d}"


def current_owner() -> str:
    """The identity of the calling process."""
    owner = owner_of(os.getpid())
    if owner is None:
        raise RuntimeError("cannot read /proc/self/stat: shm:// needs Linux procfs")
    return owner


def owner_alive(owner: str) -> bool:
    """Whether the process named by ``owner`` still runs; detached owners count as alive."""
    if owner == DETACHED:
        return True
    try:
        pid = int(owner.split(".", 1)[0])
    except ValueError:
        return False
    return owner_of(pid) == owner
