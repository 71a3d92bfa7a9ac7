"""Whether a process is running: the one liveness rule every plane's lease and watchdog uses."""

from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True while ``pid`` names a running process on this host (one owned by another user
    counts); False for a process that has exited, including a zombie not yet reaped.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (or the process just went): the signal check stands
    # The state letter follows the parenthesised command name, which may itself hold ")".
    return stat[stat.rindex(")") + 2 :][:1] != "Z"
