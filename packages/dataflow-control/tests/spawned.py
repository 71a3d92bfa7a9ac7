"""Starting the helper scripts as real processes, their stderr kept in a file for assertions."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


class Spawned:
    """A child running one of this directory's scripts; ``errors()`` reads what it wrote to
    stderr (a file, so no pipe is ever left unread or unclosed)."""

    def __init__(self, script: str, args: list[str], run_dir: Path) -> None:
        self.err_path = run_dir / f"{Path(script).stem}-{time.monotonic_ns()}.err"
        with open(self.err_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / script), *args],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    def errors(self) -> str:
        return self.err_path.read_text(encoding="utf-8")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        """SIGKILL (unless it already exited) and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
