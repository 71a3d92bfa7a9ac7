"""The machine a benchmark ran on, as the report states it."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Machine:
    """Cores, memory, CPU model, interpreter and torch versions, load at a moment."""

    cpus: int
    memory_gib: float
    cpu_model: str
    python: str
    torch: str
    kernel: str

    @classmethod
    def here(cls) -> Machine:
        """Read from /proc and the running interpreter (``unknown`` where a source is missing)."""
        model = "unknown"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        memory = 0.0
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    memory = int(line.split()[1]) / 2**20
                    break
        except OSError:
            pass
        try:
            import torch

            torch_version = torch.__version__
        except ImportError:
            torch_version = "not installed"
        return cls(
            cpus=os.cpu_count() or 0,
            memory_gib=memory,
            cpu_model=model,
            python=platform.python_version(),
            torch=torch_version,
            kernel=platform.release(),
        )
