"""Which floating-point dtype the target and the trainer use when the config says ``auto``.

On CPU, bf16 is only fast where the processor computes it natively: ``avx512_bf16`` or AMX
(``amx_bf16``) in ``/proc/cpuinfo``. Elsewhere (AVX2-only machines) bf16 matmuls are emulated
and a demo was measured 8.5x slower than in fp32, so fp32 is chosen there. On CUDA, bf16 where
the device supports it. The choice and its reason go into the run summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""``/proc/cpuinfo`` flags that mean native bf16 arithmetic on x86."""

_CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class DtypeChoice:
    """A chosen dtype (``"bfloat16"``, ``"float16"`` or ``"float32"``) and why, in words."""

    dtype: str
    reason: str


def cpu_flags(cpuinfo_text: str) -> frozenset[str]:
    """The ``flags`` of every processor listed in ``cpuinfo_text`` (``/proc/cpuinfo`` format)."""
    flags: set[str] = set()
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def read_cpuinfo() -> str:
    """The text of ``/proc/cpuinfo`` on this machine (empty where there is none)."""
    try:
        return _CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def choose_cpu_dtype(cpuinfo_text: str) -> DtypeChoice:
    """bf16 when ``cpuinfo_text`` lists a native-bf16 flag, else fp32, with the reason."""
    found = [flag for flag in CPU_BF16_FLAGS if flag in cpu_flags(cpuinfo_text)]
    if found:
        return DtypeChoice("bfloat16", f"auto: the CPU has native bf16 ({', '.join(found)})")
    return DtypeChoice(
        "float32",
        f"auto: the CPU lacks native bf16 (no {' or '.join(CPU_BF16_FLAGS)} in /proc/cpuinfo); "
        "emulated bf16 is several times slower than fp32",
    )


def choose_dtype(configured: str, device: str, cpuinfo_text: str | None = None) -> DtypeChoice:
    """The dtype for ``configured`` (a dtype name, or ``"auto"``) on ``device``.

    A configured dtype is kept as given. ``auto`` on CPU follows :func:`choose_cpu_dtype`
    (``cpuinfo_text`` defaults to this machine's); on CUDA it is bf16 where the device
    supports it, fp32 otherwise; on MPS fp32.
    """
    if configured != "auto":
        return DtypeChoice(configured, "set in the config")
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return DtypeChoice("bfloat16", "auto: the CUDA device supports bf16")
        return DtypeChoice("float32", "auto: the CUDA device lacks bf16")
    if device == "mps":
        return DtypeChoice("float32", "auto: fp32 on mps")
    return choose_cpu_dtype(read_cpuinfo() if cpuinfo_text is None else cpuinfo_text)


def trainer_device() -> str:
    """The device the trainer's default backend computes on (``cuda`` when present)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
