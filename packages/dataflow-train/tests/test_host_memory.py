"""The host-memory policy: a freed activation-sized block is reused without faulting pages in."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from dataflow.train.host_memory import MMAP_THRESHOLD, retain_freed_host_memory

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


@glibc
def test_freed_block_is_reused_without_page_faults() -> None:
    assert retain_freed_host_memory() is True
    assert retain_freed_host_memory() is True  # once: a second call changes nothing
    numel = (MMAP_THRESHOLD // 2) // 4  # a 16 MiB fp32 tensor, below the fixed threshold
    pages = numel * 4 // 4096
    faults = []
    for _ in range(6):
        before = _minor_faults()
        block = torch.ones(numel)  # writes every page
        del block
        faults.append(_minor_faults() - before)
    # The first rounds may grow the heap; the later ones reuse its pages. (Under glibc's
    # default policy a block this size faults about half its pages in again every round.)
    assert max(faults[-3:]) < pages // 16, faults
