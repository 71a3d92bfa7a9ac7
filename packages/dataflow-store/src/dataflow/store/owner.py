"""Who owns a segment: a process identity that survives pid reuse (pid + kernel start time).

The identity also names the pid namespace it was taken in, so that a process in another
namespace sharing the same ``/dev/shm`` (another container) is never judged dead just because
its pid is not visible here.

Guarantees: :func:`current_owner` is stable for the life of this process and always the same
width; :func:`owner_alive` is False only when the owner was in this pid namespace and that exact
process is gone (a reused pid does not count as alive).
"""

from __future__ import annotations

import os

DETACHED = "0000000000.00000000000000000000.000000000000"
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


def _pid_namespace() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def owner_of(pid: int) -> str | None:
    """The identity of process ``pid`` (of this namespace), or None if it is not running."""
    start = _start_time(pid)
    return None if start is None else f"{pid:010d}.{start:020d}.{_pid_namespace():012d}"


def current_owner() -> str:
    """The identity of the calling process."""
    owner = owner_of(os.getpid())
    if owner is None:
        raise RuntimeError("cannot read /proc/self/stat: shm:// needs Linux procfs")
    return owner


def owner_alive(owner: str) -> bool:
    """Whether the process named by ``owner`` may still run.

    Detached owners and owners from another pid namespace count as alive (nothing here can
    prove them dead); a malformed owner counts as dead.
    """
    if owner == DETACHED:
        return True
    try:
        pid_text, _, namespace = owner.split(".")
        pid, ns = int(pid_text), int(namespace)
    except ValueError:
        return False
    if ns != _pid_namespace():
        return True
    return owner_of(pid) == owner
