"""Helpers for tests that run real producer/consumer processes (python -c children)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

PRELUDE = textwrap.dedent(
    """
    import sys, torch
    from dataflow.contracts import SampleRef, dumps, loads
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


def start_child(code: str, *args: str) -> subprocess.Popen[str]:
    """Start ``code`` (after :data:`PRELUDE`) in a fresh interpreter without waiting."""
    return subprocess.Popen(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args],
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
