"""A managed vLLM server: the exact command line for a config, started, health-checked,
supervised and stopped by the producer.

The server runs under :mod:`dataflow.launch.engines.vllm_keeper` in a process group of its own,
so stopping it (or the producer dying, even by ``SIGKILL``) stops every vLLM process: the
keeper watches the producer and kills the group. vLLM's caches, IPC sockets and temporary files
go to a private temporary directory, removed at stop.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dataflow.contracts import BackendUnavailableError, InvalidInputError
from dataflow.launch.config import TargetSection
from dataflow.launch.engines.layers import resolve_aux_layer_ids
from dataflow.launch.engines.target_files import read_model_config
from dataflow.launch.engines.vllm_keeper import RECORD_ENV, sweep_recorded
from dataflow.launch.engines.vllm_wire import server_args, vllm_layer_ids
from dataflow.launch.precision import choose_dtype

API_MODULE = "vllm.entrypoints.openai.api_server"


def free_port(host: str) -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_command(
    target: TargetSection, *, port: int, capture_dir: str, store_capture: bool | None = None
) -> list[str]:
    """``python -m vllm.entrypoints.openai.api_server ...`` for ``target`` (engine ``vllm``);
    ``store_capture`` (default: ``target.vllm.capture_mode == "store"``) lets the connector
    take store-mode requests.
    """
    if store_capture is None:
        store_capture = target.vllm.capture_mode == "store"
    if target.model_dir is None:
        raise InvalidInputError("target.model_dir: required by the vllm engine")
    config = read_model_config(target.model_dir)
    num_layers = int(config["num_hidden_layers"])
    aux = resolve_aux_layer_ids(num_layers, target.aux_layer_ids)
    section = target.vllm
    python = section.python or sys.executable
    return [
        python,
        "-m",
        API_MODULE,
        *server_args(
            str(Path(target.model_dir).resolve()),
            layer_ids=vllm_layer_ids(aux, num_layers),
            dtype=choose_dtype(target.dtype, target.device).dtype,
            capture_dir=capture_dir,
            host=section.host,
            port=port,
            eager=section.enforce_eager,
            max_model_len=section.max_model_len,
            extra_args=section.extra_args,
            store_capture=store_capture,
        ),
    ]


def server_env(private_dir: str, kv_cache_gib: float) -> dict[str, str]:
    """Environment of a managed server: vLLM's caches and sockets kept in ``private_dir``."""
    env = dict(os.environ)
    env.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_cache_gib))),
            "VLLM_CACHE_ROOT": f"{private_dir}/cache",
            "VLLM_RPC_BASE_PATH": private_dir,
            "TMPDIR": private_dir,
            "XDG_CACHE_HOME": f"{private_dir}/cache",
            "TORCHINDUCTOR_CACHE_DIR": f"{private_dir}/inductor",
            "HF_HOME": f"{private_dir}/hf",
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
        }
    )
    # The connector module must import in vLLM's processes: give them this package's path.
    import dataflow.launch

    paths = [str(Path(p).resolve().parent) for p in dataflow.launch.__path__]
    import dataflow.contracts

    paths += [str(Path(p).resolve().parent) for p in dataflow.contracts.__path__]
    import dataflow.store  # store mode: the connector writes into the run's feature store

    paths += [str(Path(p).resolve().parent) for p in dataflow.store.__path__]
    extra = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*paths, *extra.split(os.pathsep)]))
    env["PYTHONPATH"] = env["PYTHONPATH"].strip(os.pathsep)
    return env


class ManagedVLLMServer:
    """One vLLM server process tree owned by this process.

    Guarantees: ``start`` returns once ``/health`` answers 200, or raises
    :class:`BackendUnavailableError` with the end of the server's log (the tree is stopped
    first); ``stop`` is idempotent and leaves no vLLM process; a producer killed by any signal
    leaves none either (the keeper's watch).
    """

    def __init__(self, target: TargetSection) -> None:
        self._target = target
        self._private = tempfile.mkdtemp(prefix="dfv-", dir="/tmp")
        self.capture_dir = target.vllm.capture_dir or f"{self._private}/captures"
        self.port = target.vllm.port or free_port(target.vllm.host)
        # A managed server is private to its producer (loopback, a port of its own): it takes
        # both capture modes, so one server serves file and store requests alike.
        self.command = server_command(
            target, port=self.port, capture_dir=self.capture_dir, store_capture=True
        )
        self.url = f"http://{target.vllm.host}:{self.port}"
        self.log_path = f"{self._private}/server.log"
        self.shm_record = f"{self._private}/shm-segments"
        self._process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def alive(self) -> bool:
        """Whether the server's process tree is running."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The keeper's pid (the process group id of the whole server tree)."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start (or restart) the server and wait for ``/health``."""
        import requests

        self.stop_tree()
        Path(self.capture_dir).mkdir(parents=True, exist_ok=True)
        keeper = [sys.executable, "-m", "dataflow.launch.engines.vllm_keeper", str(os.getpid())]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [*keeper, "--", *self.command],
                env={
                    **server_env(self._private, self._target.vllm.kv_cache_gib),
                    RECORD_ENV: self.shm_record,
                },
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + self._target.vllm.startup_timeout_s
        while time.monotonic() < deadline:
            if not self.alive:
                self.stop_tree()
                raise BackendUnavailableError(
                    f"the managed vLLM server exited during start-up:\n{self.log_tail()}"
                )
            try:
                if requests.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop_tree()
        raise BackendUnavailableError(
            f"the managed vLLM server was not healthy within "
            f"target.vllm.startup_timeout_s={self._target.vllm.startup_timeout_s} s:\n"
            f"{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log."""
        try:
            text = Path(self.log_path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop_tree(self, timeout_s: float = 30.0) -> None:
        """Stop the server tree (SIGTERM to the keeper, SIGKILL to the group after
        ``timeout_s``).
        """
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        _wait_group_gone(process.pid)
        # The keeper sweeps the tree's /dev/shm segments itself; when it was SIGKILLed with its
        # group, its record of them is swept here.
        sweep_recorded(self.shm_record)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.shm_record)

    def stop(self) -> None:
        """Stop the server and remove its private directory (idempotent)."""
        self.stop_tree()
        import shutil

        shutil.rmtree(self._private, ignore_errors=True)


def _wait_group_gone(group: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def printed_command(target: TargetSection) -> str:
    """The shell line (environment included) that starts a server for ``target`` by hand."""
    capture = target.vllm.capture_dir or f"{tempfile.gettempdir()}/dataflow-vllm-captures"
    port = target.vllm.port or 8000
    env = f"VLLM_CPU_KVCACHE_SPACE={max(1, round(target.vllm.kv_cache_gib))}"
    if target.vllm.capture_mode == "store":
        # The connector imports dataflow.store in the server; a dir:// store's token comes
        # from the server's environment (never the command line).
        env += " DATAFLOW_STORE_TOKEN=${DATAFLOW_STORE_TOKEN:-}"
    return f"{env} {shlex.join(server_command(target, port=port, capture_dir=capture))}"
