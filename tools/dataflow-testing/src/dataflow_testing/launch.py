"""What the launch package's tests and the gates share: a seconds-long job size, the CLI."""

from __future__ import annotations

import sys
from pathlib import Path

TINY_JOB = (
    "target.builtin.weights=random",
    "target.builtin.hidden_size=32",
    "target.builtin.num_layers=8",
    "target.builtin.num_heads=2",
    "target.builtin.num_kv_heads=1",
    "target.builtin.intermediate_size=64",
    "target.batch_size=4",
    "data.max_length=48",
    "trainer.ttt_length=2",
    "trainer.draft_vocab_size=128",
    "trainer.batch_size=2",
    "trainer.accumulation_steps=1",
    "trainer.warmup_steps=1",
    "trainer.max_steps=null",
)
"""``--set`` overrides that shrink any example config to a seconds-long job (windows of 2
samples, a 32-wide built-in target, a 2-step TTT draft)."""


def console_script(name: str = "dataflow-launch") -> Path:
    """The console script ``name`` installed next to this interpreter.

    Tests run the real entry point, so a missing one is an installation error, raised here.
    """
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise RuntimeError(f"no {name} next to {sys.executable}: install the package providing it")
    return path
