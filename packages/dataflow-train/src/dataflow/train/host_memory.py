"""Keep freed host memory mapped, so a training step does not page-fault its activations back in.

glibc's malloc serves a block above its mmap threshold with a fresh ``mmap`` and gives it back to
the kernel on ``free``; it also trims the top of the heap once more than the trim threshold is
free. Both thresholds move at run time. A CPU training step allocates and frees the same tens
of megabytes of activations and gradients every step, so under the default policy each step
faults a varying part of them in again (measured on bench-train: 4k to 130k minor faults per
step, up to ~0.2 s of kernel time, more on one of two interleaved loops than on the other by
chance of the heap's layout). Fixing both thresholds high makes a freed block stay in the heap
for the next step to reuse, as PyTorch's CUDA caching allocator does for device memory; the
process then keeps its peak host memory instead of returning it between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""Blocks below this come from the heap (glibc's largest allowed value on 64-bit)."""
TRIM_THRESHOLD = 1 << 30
"""The heap top is returned to the kernel only past this much free memory."""

_lock = threading.Lock()
_applied: bool | None = None


def retain_freed_host_memory() -> bool:
    """Set glibc's mmap and trim thresholds to :data:`MMAP_THRESHOLD` / :data:`TRIM_THRESHOLD`
    for this process, once; later calls change nothing.

    Returns whether the thresholds are in force (``False`` where the C library is not glibc
    or refuses them: nothing is changed then and training runs as before).
    """
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply()
        return _applied


def _apply() -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has no mallopt thresholds)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; the mmap threshold first, so a refusal leaves the trim
    # threshold as it was as well.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
