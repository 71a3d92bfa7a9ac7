"""What the equivalence gate's tests share: the tiny run settings, the CLI, curve comparison.

Every path trains the same draft for the same built-in target on the same prompts with the same
seed; only the topology, the store, the ledger or the rank layout differ. A path's per-step loss
curve is read from its ``metrics.jsonl`` (what the trainer logged) and compared step by step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples"

PROMPTS = int(os.environ.get("EQUIVALENCE_PROMPTS", "8"))
"""Prompts in the gate's dataset (CI variant: 8; ``nox -s equivalence-long``: 96)."""

RUN_ID = "equiv"
SEED = 0

# One sample per micro-batch and two micro-batches per optimizer step: one rank (batch 1,
# accumulation 2) then sees per step exactly what two data-parallel ranks (batch 1 each) see,
# and the target captures one prompt at a time everywhere (the hf engine's features are only
# bit-reproducible for the same batch composition).
TINY = (
    f"run.id={RUN_ID}",
    f"run.seed={SEED}",
    "target.builtin.hidden_size=32",
    "target.builtin.num_layers=8",
    "target.builtin.num_heads=2",
    "target.builtin.num_kv_heads=1",
    "target.builtin.intermediate_size=64",
    "target.batch_size=1",
    "data.max_length=64",
    f"data.max_prompts={PROMPTS}",
    "data.passes=1",
    "data.shuffle=false",
    "trainer.ttt_length=3",
    "trainer.draft_vocab_size=512",
    "trainer.batch_size=1",
    "trainer.accumulation_steps=2",
    "trainer.warmup_steps=1",
    "trainer.lr=0.01",
    "trainer.bf16=false",
    f"trainer.total_steps={PROMPTS // 2}",
    "trainer.max_steps=null",
    "trainer.checkpoint_every=0",
    "flow.high_watermark=16",
    "flow.low_watermark=8",
    "producer.workers=1",
)
"""Overrides shrinking any example config to the gate's run (fp32, so rank layouts compare)."""

STEPS = PROMPTS // 2


@dataclass(frozen=True)
class Curve:
    """A path's logged per-step ``loss`` and global ``grad_norm``, and the samples of each step."""

    loss: dict[int, float]
    grad_norm: dict[int, float]

    @property
    def steps(self) -> int:
        return len(self.loss)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(run_dir: Path) -> Curve:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return Curve({r["step"]: r["loss"] for r in rows}, {r["step"]: r["grad_norm"] for r in rows})


def max_delta(a: dict[int, float], b: dict[int, float]) -> float:
    """Largest |a[s] - b[s]| over the steps; ``inf`` when the step sets differ."""
    if a.keys() != b.keys():
        return float("inf")
    return max((abs(a[s] - b[s]) for s in a), default=0.0)


def trained_steps(run_dir: Path) -> list[list[str]]:
    """``trained.jsonl``: the sample ids of each optimizer step, in step order."""
    rows = read_jsonl(run_dir / "trained.jsonl")
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), rows
    return [r["sample_ids"] for r in rows]


def prompt_index(sample_id: str) -> int:
    """The prompt-file line index in a sample id ``<run>-p<pass>-<index>``."""
    return int(sample_id.rsplit("-", 1)[1])


def reordered_prompts(reference: Path, dest: Path) -> Path:
    """The reference's prompts, one line each, in the order the reference trained them (an
    online run trains in arrival order: line i is then the reference's i-th sample).
    """
    from dataflow.launch.data.prompts import demo_prompts_path

    lines = demo_prompts_path().read_text(encoding="utf-8").splitlines()
    order = [prompt_index(sid) for step in trained_steps(reference) for sid in step]
    dest.write_text("".join(lines[i] + "\n" for i in order), encoding="utf-8")
    return dest


def sets(*items: str) -> list[str]:
    out: list[str] = []
    for item in items:
        out += ["--set", item]
    return out


def launch_cli() -> Path:
    path = Path(sys.executable).parent / "dataflow-launch"
    assert path.exists(), f"no dataflow-launch next to {sys.executable}: install dataflow-launch"
    return path


def run_topology(example: str, out: Path, *overrides: str, timeout: float = 300) -> str:
    """``dataflow-launch run examples/<example>.yaml`` with the gate's settings; its stdout."""
    result = subprocess.run(
        [
            str(launch_cli()),
            "run",
            str(EXAMPLES / f"{example}.yaml"),
            "--no-progress",
            *sets(*TINY, f"run.out_dir={out}", *overrides),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, (
        f"{example} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
    assert "== dataflow run summary" in result.stdout, result.stdout
    return result.stdout
