"""The machine a benchmark ran on, as the report states it."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

SIMD_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
)
"""The flags that change which CPU kernels run (bf16 is native only with avx512_bf16 or AMX)."""


@dataclass(frozen=True)
class Machine:
    """Cores, memory, CPU model and the SIMD flags that decide kernels (bf16 or not), interpreter
    and torch versions (with the CPU capability torch dispatches to).
    """

    cpus: int
    memory_gib: float
    cpu_model: str
    cpu_flags: tuple[str, ...]
    """Of :data:`SIMD_FLAGS`, those /proc/cpuinfo lists."""
    torch_capability: str
    python: str
    torch: str
    kernel: str

    @classmethod
    def here(cls) -> Machine:
        """Read from /proc and the running interpreter (``unknown`` where a source is missing)."""
        model = "unknown"
        flags: set[str] = set()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
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
            capability = str(torch.backends.cpu.get_cpu_capability())
        except ImportError:
            torch_version = capability = "not installed"
        return cls(
            cpus=os.cpu_count() or 0,
            memory_gib=memory,
            cpu_model=model,
            cpu_flags=tuple(f for f in SIMD_FLAGS if f in flags),
            torch_capability=capability,
            python=platform.python_version(),
            torch=torch_version,
            kernel=platform.release(),
        )
