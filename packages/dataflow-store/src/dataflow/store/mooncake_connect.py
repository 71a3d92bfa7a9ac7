"""Reaching a Mooncake master safely: a bounded failure instead of a minute-long hang.

Measured on mooncake-transfer-engine-non-cuda 0.3.13: ``setup()`` against an address where no
master listens returns -1 only after ~90 s, and against a port that accepts TCP but does not
speak Mooncake's RPC it blocks indefinitely; in both cases it holds the GIL, so no thread in the
process can time it out. Hence two checks before the real ``setup()``, both bounded by the
settings' ``connect_timeout_s``:

1. a plain TCP connect to the master's RPC port (refused or silent -> error in <= timeout);
2. (optional, on by default) the same ``setup()`` in a child process that is killed at the
   timeout — a port that is not a master, a wrong metadata server or a broken wheel then fails
   in seconds, with the child's last log lines in the message.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from types import ModuleType

from dataflow.contracts import BackendUnavailableError
from dataflow.store.mooncake_settings import MooncakeSettings

_PROBE = r"""
import json, os, sys
args = json.loads(sys.argv[1])
from mooncake.store import MooncakeDistributedStore
client = MooncakeDistributedStore()  # kept alive: dropping it would run its ~1 s teardown
rc = client.setup(*args)
sys.stdout.write(json.dumps({"rc": rc}))
sys.stdout.flush()
os._exit(0)  # skip the client's ~1 s teardown: this process only proves the handshake works
"""

_INSTALL_HINT = (
    "install the Mooncake extra: pip install 'dataflow-store[mooncake-cpu]' on CPU machines "
    "(mooncake-transfer-engine-non-cuda) or 'dataflow-store[mooncake]' with CUDA; never both"
)


def load_binding() -> ModuleType:
    """Import ``mooncake.store``; a missing or broken wheel is a ``BackendUnavailableError``."""
    try:
        import mooncake.store as binding
    except ImportError as exc:
        raise BackendUnavailableError(
            f"cannot import mooncake.store ({exc}); {_INSTALL_HINT}"
        ) from None
    return binding


def check_reachable(settings: MooncakeSettings) -> None:
    """Raise ``BackendUnavailableError`` unless the master's RPC port accepts a TCP connection
    within ``connect_timeout_s``.
    """
    address = settings.master_address
    try:
        with socket.create_connection(
            (settings.master_host, settings.master_port), timeout=settings.connect_timeout_s
        ):
            return
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
    raise BackendUnavailableError(
        f"no Mooncake master reachable at {address} ({reason}, waited at most "
        f"{settings.connect_timeout_s:g} s): start mooncake_master with --rpc_port="
        f"{settings.master_port} or fix the mooncake:// URI"
    )


def probe_handshake(settings: MooncakeSettings) -> None:
    """Run Mooncake's ``setup()`` in a child process killed after ``connect_timeout_s``.

    The child mounts no segment and exits without tearing down. Raises
    ``BackendUnavailableError`` if it does not finish in time or ``setup()`` returns non-zero.
    """
    args = list(settings.setup_args())
    args[2] = 0  # global segment: the probe shares no memory
    args[3] = 1 << 20  # local buffer: the minimum useful
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=settings.connect_timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BackendUnavailableError(
            f"{settings.master_address} accepts connections but did not complete a Mooncake "
            f"handshake within {settings.connect_timeout_s:g} s (metadata server "
            f"{settings.metadata_server!r}): is it a mooncake_master RPC port?"
        ) from None
    try:
        rc = int(json.loads(done.stdout or "{}")["rc"])
    except (KeyError, TypeError, ValueError):
        rc = None
    if rc != 0:
        tail = "\n".join((done.stderr or "").strip().splitlines()[-8:])
        raise BackendUnavailableError(
            f"Mooncake setup() against {settings.master_address} failed in a probe process "
            f"(setup returned {rc}, exit status {done.returncode}):\n{tail}"
        )
