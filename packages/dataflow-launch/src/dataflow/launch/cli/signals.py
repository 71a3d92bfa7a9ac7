"""Stop signals and parent death: every ``dataflow-launch`` process stops the way Ctrl-C does.

``SIGTERM`` (``timeout``, systemd, ``docker stop``, Kubernetes) and ``SIGHUP`` (a closed
terminal) raise :class:`StopSignal` in the main thread. It is a ``KeyboardInterrupt``, so every
path that already cleans up after Ctrl-C (children stopped, leases and assignments released,
features freed) runs unchanged; the command then exits with ``128 + signal`` (143, 129).

A role started by ``run`` (see ``builders/supervise.py``) also follows its supervisor: the
kernel sends it ``SIGTERM`` when its parent dies (``PR_SET_PDEATHSIG``), and a watchdog thread
does the same when the supervisor's pid is gone or the process was re-parented (the fallback
where ``prctl`` is missing, and for torchrun ranks, whose parent is torchrun, not ``run``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

from dataflow.contracts.processes import pid_alive

SUPERVISOR_ENV = "DATAFLOW_SUPERVISOR_PID"
"""Environment variable naming the pid of the ``run`` process a role belongs to."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""Signals that stop a command like Ctrl-C does."""

_PR_SET_PDEATHSIG = 1
WATCH_INTERVAL_S = 0.5


class StopSignal(KeyboardInterrupt):
    """A stop signal arrived; ``signum`` says which. The command exits ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """``128 + signum``, what a shell reports for a process that signal ended."""
        return 128 + self.signum


def exit_status(exc: KeyboardInterrupt) -> int:
    """The exit status for an interrupt: ``128 + signum`` for a stop signal, 130 for Ctrl-C."""
    return exc.exit_status if isinstance(exc, StopSignal) else 128 + signal.SIGINT


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise StopSignal(signum)


@contextlib.contextmanager
def stop_handlers() -> Iterator[None]:
    """Inside the block, ``SIGTERM`` and ``SIGHUP`` raise :class:`StopSignal` in the main
    thread; the previous handlers come back after it (a no-op outside the main thread).

    A signal the process inherited as ignored (``nohup``) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, _raise_stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class deferred_stop_signals:
    """A block no stop signal or Ctrl-C interrupts (e.g. stopping children): signals that
    arrive inside it are held by the kernel and delivered when it ends.
    """

    _SIGNALS = frozenset({signal.SIGINT, *STOP_SIGNALS})

    def __enter__(self) -> None:
        self._previous = signal.pthread_sigmask(signal.SIG_BLOCK, self._SIGNALS)

    def __exit__(self, *exc: object) -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, self._previous)


def _set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send ``signum`` when this process's parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def follow_supervisor(env: dict[str, str] | None = None) -> int | None:
    """If this process is a role of a ``run`` (``DATAFLOW_SUPERVISOR_PID`` set), stop it
    (``SIGTERM`` to itself) when its parent or the supervisor dies; return the supervisor pid.

    Also checked at once, so a supervisor that died before this call is noticed too.
    """
    value = (os.environ if env is None else env).get(SUPERVISOR_ENV)
    if not value:
        return None
    supervisor = int(value)
    parent = os.getppid()
    _set_parent_death_signal(signal.SIGTERM)

    def orphaned() -> bool:
        return os.getppid() != parent or not pid_alive(supervisor)

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(WATCH_INTERVAL_S):
            if orphaned():
                os.kill(os.getpid(), signal.SIGTERM)
                return

    if orphaned():
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="dataflow-supervisor-watch", daemon=True).start()
    return supervisor
