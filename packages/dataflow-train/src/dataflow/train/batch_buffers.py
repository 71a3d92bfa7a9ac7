"""Reusable batch buffers: collation writes into memory that is already mapped and faulted.

A fresh multi-megabyte batch tensor per batch costs page faults on every page it touches (and
the free afterwards returns the pages). :class:`BatchBuffers` keeps a few flat buffers and hands
one out again only when it is provably idle. Small tensors gain nothing from it: the allocator
serves them from memory it already holds (no page faults), faster than a pool lookup, so
collation pools only batch tensors of at least :data:`POOL_MIN_BYTES`.

The reuse rule: a buffer is handed out again only when nothing but the pool references its
storage, read from the storage's use count. Every batch tensor, every view of one, every tensor
autograd saved for a backward that has not run yet, and every batch a caller still holds (a list
of batches, a queue) counts; so a batch buffer is reused only after the step that used it is
finished and its batch dropped, and a batch the caller keeps is never overwritten.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_use_count = getattr(torch._C, "_storage_Use_Count", None)

POOL_MIN_BYTES = 128 * 1024
"""The size from which a fresh allocation is mapped anew (glibc's default mmap threshold), so
page faults on it are worth a kept buffer; smaller tensors are allocated fresh."""


@dataclass
class _Kept:
    flat: torch.Tensor
    cdata: int  # its storage's address: read without creating a storage object per check
    idle_uses: int  # the storage's use count while only the pool holds it

    def idle(self) -> bool:
        assert _use_count is not None
        return int(_use_count(self.cdata)) == self.idle_uses


class BatchBuffers:
    """A bounded pool of flat CPU buffers for collation output (see the module docstring).

    Guarantees: ``take`` returns an uninitialised contiguous tensor of the asked shape and
    dtype whose memory nothing else references (a reused buffer, or a fresh one); at most
    ``max_buffers`` buffers are kept (beyond that a fresh tensor is handed out and not kept);
    ``clear`` drops every kept buffer. Where torch cannot report a storage's use count the pool
    keeps nothing and every ``take`` allocates.
    """

    def __init__(self, max_buffers: int = 16) -> None:
        if not isinstance(max_buffers, int) or isinstance(max_buffers, bool) or max_buffers < 0:
            raise ValueError(f"max_buffers must be an int >= 0, got {max_buffers!r}")
        self._max = max_buffers if _use_count is not None else 0
        self._kept: list[_Kept] = []  # least recently handed out first
        self._lock = threading.Lock()
        self.reused = 0
        """How many ``take`` calls were served by a kept buffer."""

    @property
    def kept(self) -> int:
        """How many buffers the pool holds now."""
        return len(self._kept)

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` and ``dtype`` to write a batch feature into."""
        numel = math.prod(shape)
        with self._lock:
            first_idle = -1
            for i, kept in enumerate(self._kept):  # the oldest first: the likeliest idle
                if kept.flat.dtype != dtype or not kept.idle():
                    continue
                if kept.flat.numel() >= numel:
                    self.reused += 1
                    self._kept.append(self._kept.pop(i))
                    return kept.flat[:numel].view(shape)
                if first_idle < 0:
                    first_idle = i
            fresh = torch.empty(numel, dtype=dtype)
            if len(self._kept) >= self._max:
                if first_idle < 0:  # every kept buffer is in use: this one is the caller's alone
                    return fresh.view(shape)
                del self._kept[first_idle]  # an idle buffer too small
            assert _use_count is not None
            cdata = fresh.untyped_storage()._cdata
            self._kept.append(_Kept(fresh, cdata, int(_use_count(cdata))))
            return fresh.view(shape)

    def clear(self) -> None:
        """Drop every kept buffer (tensors already handed out stay valid)."""
        with self._lock:
            self._kept.clear()
