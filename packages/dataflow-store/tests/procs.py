"""Helpers for tests that run real producer/consumer processes (python -c children)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from dataflow.store.owner import current_owner

DEAD = current_owner().replace(f"{os.getpid():010d}.", f"{1:010d}.", 1)
"""An owner in this pid namespace that is not running: pid 1 never has this process's start time."""

PRELUDE = textwrap.dedent(
    """
    import sys, torch
    from dataflow.contracts import SampleRef
    from dataflow.contracts.codec import dumps, loads
    from dataflow.store import open_store

    def sample(seed, tokens=64, hidden=32):
        g = torch.Generator().manual_seed(seed)
        return {
            "input_ids": torch.randint(0, 32000, (tokens,), generator=g),
            "loss_mask": torch.randint(0, 2, (tokens,), generator=g),
            "hidden_state": torch.randn(1, tokens, hidden, generator=g).to(torch.bfloat16),
            "aux_hidden_state": torch.randn(1, tokens, 3 * hidden, generator=g).to(torch.bfloat16),
        }

    def digest(tensors):
        return {k: int(v.contiguous().view(-1).view(torch.uint8).to(torch.int64).sum()) for k, v in sorted(tensors.items())}
    """
)


def run_child(code: str, *args: str, timeout: float = 60) -> str:
    """Run ``code`` (after :data:`PRELUDE`) in a fresh interpreter; return its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


def start_child(code: str, *args: str, stdin: bool = False) -> subprocess.Popen[str]:
    """Start ``code`` (after :data:`PRELUDE`) in a fresh interpreter without waiting."""
    return subprocess.Popen(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args],
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def prelude_namespace() -> dict[str, object]:
    """The children's helpers (``sample``, ``digest``) in this process, to compute expectations."""
    namespace: dict[str, object] = {}
    exec(PRELUDE, namespace)
    return namespace


def expected_digest(seed: int) -> dict[str, int]:
    """What a child's ``digest(sample(seed))`` prints, computed here."""
    ns = prelude_namespace()
    return ns["digest"](ns["sample"](seed))  # type: ignore[operator,no-any-return]


FULL_DISK_PUT = """
import resource, signal
from dataflow.contracts import CapacityExceededError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
store = open_store(sys.argv[1])
before = store.health()
try:
    store.put("big", sample(0, tokens=4096, hidden=256))  # 8 MiB, over the 1 MiB limit
except CapacityExceededError as exc:
    print("refused:", exc)
assert store.health() == before, (store.health(), before)
"""
"""A child that puts a sample bigger than the file-size limit it set itself (a real EFBIG)."""
