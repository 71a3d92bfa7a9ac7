"""Writing one sample into a file (a /dev/shm segment or a shared-directory file) and reading it.

The bytes follow :mod:`dataflow.store.layout` (safetensors). Writers copy each tensor's bytes
straight from its memory into the file (``pwrite``, no staging buffer); readers either map the
file and view tensors in place (:func:`map_sample`, zero copy) or read it once into one private
buffer (:func:`read_sample`, one copy, into huge pages when large: :func:`private_buffer`).

Guarantees: files are opened with ``O_NOFOLLOW`` (a planted symlink is refused, never
followed); a missing file raises ``NotFoundError``; a malformed header ``CorruptRecordError``;
stored specs that disagree with the ref ``SchemaMismatchError`` — all before any tensor is
returned.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Mapping

import torch

from dataflow.contracts import CapacityExceededError, CorruptRecordError, FeatureSpec, NotFoundError
from dataflow.store.layout import MAX_HEADER_BYTES, Layout, check_against, plan, read_header, view
from dataflow.store.tensors import TORCH_DTYPES, PreparedSample, as_bytes

_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
_CHUNK = 1 << 30  # Linux writes at most ~2 GiB per call; stay well below
HUGE_BUFFER_MIN = 4 << 20
"""Reads of at least this many bytes go into memory backed by transparent huge pages."""


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done : done + _CHUNK], offset + done)


_OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def write_sample(
    fd: int, sample: PreparedSample, metadata: Mapping[str, str], where: str
) -> Layout:
    """Write ``sample`` into the open file ``fd`` (header then tensors, no staging copy).

    A full filesystem (or a file-size limit) raises ``CapacityExceededError`` naming ``where``;
    the caller removes the partial file.
    """
    layout = plan(sample.specs.values(), metadata)
    try:
        _pwrite_all(fd, memoryview(layout.header), 0)
        for name, entry in layout.entries.items():
            _pwrite_all(fd, as_bytes(sample.tensors[name]), entry.start)
        if os.fstat(fd).st_size != layout.total_bytes:
            os.ftruncate(fd, layout.total_bytes)
    except OSError as exc:
        if exc.errno in _OUT_OF_SPACE:
            raise CapacityExceededError(
                f"{where}: no room for {layout.total_bytes} bytes ({os.strerror(exc.errno)}); "
                "nothing was stored"
            ) from exc
        raise
    return layout


def _open(path: str, where: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFoundError(f"{where} is not stored (released, aborted or never written)") from None
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the name is a symlink
            raise CorruptRecordError(
                f"{where}: {path} is a symlink; refusing to follow it"
            ) from None
        raise


def map_sample(
    path: str, wanted: Mapping[str, FeatureSpec], where: str
) -> tuple[dict[str, torch.Tensor], Layout]:
    """Map ``path`` copy-on-write and return tensors viewing it in place (zero copy).

    The mapping lives as long as any returned tensor; unlinking the file does not affect it, and
    writes to the tensors never reach the file.
    """
    fd = _open(path, where)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise CorruptRecordError(f"{where}: {path} is empty")
        mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    layout = read_header(mapped, size, where)
    check_against(layout, wanted, where)
    for name in wanted:
        _prefault(mapped, layout.entries[name].start, layout.entries[name].end)
    return {name: view(mapped, layout.entries[name]) for name in wanted}, layout


def _prefault(mapped: mmap.mmap, start: int, end: int) -> None:
    """Map the pages of [start, end) in one call, read-only (no copy; writes still COW).

    Faulting 4 KiB pages one at a time on first touch costs more than one batched populate.
    Kernels before 5.14 lack MADV_POPULATE_READ: the pages then fault in lazily, as usual.
    """
    first = start - start % mmap.PAGESIZE
    if end <= first:
        return
    with contextlib.suppress(OSError, ValueError):
        mapped.madvise(_MADV_POPULATE_READ, first, end - first)


def _header_of(fd: int, size: int, where: str) -> Layout:
    head = os.pread(fd, 4096, 0)
    if len(head) >= 8:
        need = 8 + int.from_bytes(head[:8], "little")
        if len(head) < need <= min(size, 8 + MAX_HEADER_BYTES):
            head += os.pread(fd, need - len(head), len(head))
    return read_header(head, size, where)


def read_sample(
    path: str, wanted: Mapping[str, FeatureSpec], where: str
) -> tuple[dict[str, torch.Tensor], Layout]:
    """Read ``path`` once into one private buffer and return tensors viewing that buffer."""
    fd = _open(path, where)
    try:
        size = os.fstat(fd).st_size
        layout = _header_of(fd, size, where)
        check_against(layout, wanted, where)
        start = len(layout.header)
        data, buffer = private_buffer(layout.total_bytes - start)
        got = 0
        while got < len(buffer):
            n = os.preadv(fd, [buffer[got : got + _CHUNK]], start + got)
            if n == 0:
                raise CorruptRecordError(f"{where}: {path} ended early")
            got += n
    finally:
        os.close(fd)
    out = {}
    for name in wanted:
        entry = layout.entries[name]
        dtype = TORCH_DTYPES[entry.spec.dtype]
        if entry.spec.numel == 0:
            out[name] = torch.empty(entry.spec.shape, dtype=dtype)
        else:
            raw = data[entry.start - start : entry.end - start]
            out[name] = raw.view(dtype).view(entry.spec.shape)
    return out, layout


def private_buffer(nbytes: int) -> tuple[torch.Tensor, memoryview]:
    """A new writable uint8 tensor of ``nbytes`` and a byte view of it, for a read to fill.

    At least :data:`HUGE_BUFFER_MIN` bytes come from an anonymous mapping advised to use
    transparent huge pages: faulting fresh memory in 4 KiB pages costs more than copying it
    (a 64 MiB read measured 35 ms into ``torch.empty``, 12 ms into huge pages). The tensor keeps
    the mapping alive and unmaps it when it dies. Where the kernel has no huge pages (or
    refuses the advice) the mapping is ordinary memory, as ``torch.empty`` would give.
    """
    if nbytes < HUGE_BUFFER_MIN:
        data = torch.empty(nbytes, dtype=torch.uint8)
        return data, data.numpy().data
    mapped = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError, ValueError):
        mapped.madvise(_MADV_HUGEPAGE)
    return torch.frombuffer(mapped, dtype=torch.uint8), memoryview(mapped)


def read_layout(path: str, where: str) -> Layout:
    """The header of ``path`` (reads only the header, never the tensor bytes)."""
    fd = _open(path, where)
    try:
        return _header_of(fd, os.fstat(fd).st_size, where)
    finally:
        os.close(fd)
