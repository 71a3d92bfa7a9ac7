"""What the GPU gates share: the CUDA condition and its exact skip reason."""

from __future__ import annotations

import pytest
import torch

NO_CUDA = "NOT RUN: no CUDA device (torch.cuda.is_available() is False)"

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)


def cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def requires_gpus(count: int) -> pytest.MarkDecorator:
    """Skip unless ``count`` CUDA devices exist (the no-CUDA reason when there are none)."""
    found = cuda_devices()
    reason = NO_CUDA if found == 0 else f"NOT RUN: needs {count} CUDA devices, found {found}"
    return pytest.mark.skipif(found < count, reason=reason)
