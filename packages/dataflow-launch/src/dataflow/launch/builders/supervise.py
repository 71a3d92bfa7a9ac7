"""Running the roles of a disaggregated run as child processes on this host.

Each role is ``python -m dataflow.launch.cli <role> ...`` in its own session, its output in
``logs/<role>.log``. The first role that fails takes the others down (SIGTERM, then SIGKILL
after a grace period) and the failure is raised with the role's own last error line; a role
that exits cleanly never cancels the others.

A stop signal to the supervisor (Ctrl-C, ``SIGTERM``, ``SIGHUP``: see ``cli/signals.py``) stops
every role the same way before it propagates, and a role whose supervisor dies (even by
``SIGKILL``) stops by itself: each child gets ``DATAFLOW_SUPERVISOR_PID`` and follows it.
Children inherit this process's environment, so ``--log-level`` (exported as
``DATAFLOW_LOG_LEVEL`` by ``cli/logs.py``) reaches every role, and each logs alike into its
``logs/<role>.log``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dataflow.contracts import RunFailedError
from dataflow.launch.builders.progress import LedgerBar, prompts_done, samples_settled
from dataflow.launch.cli.signals import SUPERVISOR_ENV, deferred_stop_signals
from dataflow.launch.config import LaunchConfig
from dataflow.launch.run_dir import RunDir


@dataclass(frozen=True)
class Role:
    """One child process: its name (log file name), its ``dataflow-launch`` arguments, and
    how many torchrun ranks run it (1: a plain process).
    """

    name: str
    args: tuple[str, ...]
    ranks: int = 1

    def argv(self) -> list[str]:
        """The child's command line."""
        cli = ["-m", "dataflow.launch.cli", *self.args, "--no-progress"]
        if self.ranks == 1:
            return [sys.executable, *cli]
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.ranks}"]
        return [sys.executable, *launcher, *cli]


def _last_error(log: Path) -> str:
    try:
        lines = [
            line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()
        ]
    except OSError:
        return "(no log)"
    for line in reversed(lines):
        if "error" in line.lower():
            return line
    return lines[-1] if lines else "(empty log)"


def _stop(procs: dict[str, subprocess.Popen[bytes]], grace_s: float) -> None:
    """SIGTERM every live child's process group, SIGKILL those still alive after ``grace_s``;
    a further stop signal waits until every child is gone.
    """
    with deferred_stop_signals():
        _terminate(procs, grace_s)


def _terminate(procs: dict[str, subprocess.Popen[bytes]], grace_s: float) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs.values():
        left = max(0.0, deadline - time.monotonic())
        try:
            proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_roles(
    roles: Sequence[Role],
    log_dir: Path,
    *,
    sequential: bool = False,
    grace_s: float = 20.0,
    poll_s: float = 0.2,
) -> None:
    """Run ``roles`` (all at once, or one after another) until every one exits 0.

    Raises ``RunFailedError`` naming the first role that failed and its last error line; no
    child outlives this call (Ctrl-C included).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, SUPERVISOR_ENV: str(os.getpid())}
    batches = [[role] for role in roles] if sequential else [list(roles)]
    for batch in batches:
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for role in batch:
                log = (log_dir / f"{role.name}.log").open("ab")
                procs[role.name] = subprocess.Popen(
                    role.argv(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    env=env,
                )
                log.close()
            while True:
                codes = {name: proc.poll() for name, proc in procs.items()}
                failed = [name for name, code in codes.items() if code not in (None, 0)]
                if failed:
                    name = failed[0]
                    _stop(procs, grace_s)
                    raise RunFailedError(
                        f"the {name} process exited with status {codes[name]}: "
                        f"{_last_error(log_dir / f'{name}.log')} (log: {log_dir / f'{name}.log'})"
                    )
                if all(code == 0 for code in codes.values()):
                    break
                time.sleep(poll_s)
        finally:
            _stop(procs, grace_s)


def run_disaggregated(
    config: LaunchConfig,
    run_dir: RunDir,
    config_argv: Sequence[str],
    *,
    resume: bool,
    progress: bool,
) -> None:
    """A disaggregated run on this host: the producer and consumer roles as child processes
    sharing the config's ledger and store, with progress bars read from the ledger.
    """
    consume = ("consume", *config_argv, *(["--resume"] if resume else []))
    roles = [
        Role("producer", ("produce", *config_argv)),
        Role("consumer", consume, ranks=config.trainer.world_size),
    ]
    total = _planned_samples(config)
    bars = [
        LedgerBar(config.ledger.uri, total, "Produced", prompts_done, enabled=progress, position=0),
    ]
    if config.topology.online:
        bars.append(
            LedgerBar(
                config.ledger.uri, total, "Trained ", samples_settled, enabled=progress, position=1
            )
        )
    with contextlib.ExitStack() as stack:
        for bar in bars:
            stack.enter_context(bar)
        run_roles(roles, run_dir.logs)


def _planned_samples(config: LaunchConfig) -> int:
    """Prompt tasks the run will capture (from the prompt file, without a tokenizer)."""
    from dataflow.launch.data import demo_prompts_path

    path = Path(config.data.path) if config.data.path else demo_prompts_path()
    try:
        lines = sum(1 for line in path.open(encoding="utf-8") if line.strip())
    except OSError:
        return 0
    if config.data.max_prompts is not None:
        lines = min(lines, config.data.max_prompts)
    passes = config.data.passes if config.topology.online else 1
    return lines * passes
