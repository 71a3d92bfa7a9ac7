"""The end-of-run summary: steps, samples, producer and trainer throughput, final metrics, paths."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dataflow.launch.run_dir import RunDir, read_json, write_json_atomic
from dataflow.launch.trained_log import TrainedLog

HEADLINE = (
    "loss",
    "train/acc",
    "train/acceptance_rate",
    "train/simulated_acceptance_length",
)


@dataclass(frozen=True)
class RunSummary:
    """What a finished run did and where its outputs are (JSON-compatible)."""

    topology: str
    steps: int
    samples_trained: int
    distinct_samples: int
    producer: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    first_metrics: dict[str, float] = field(default_factory=dict)
    final_metrics: dict[str, float] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    ledger: dict[str, Any] = field(default_factory=dict)
    precision: dict[str, dict[str, str]] = field(default_factory=dict)
    """``{"target"|"trainer": {"dtype", "reason"}}``: what ran and why."""
    serving: dict[str, Any] = field(default_factory=dict)
    """``eval`` results (before / after training) when the run measured them."""


def _pick(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in HEADLINE if isinstance(metrics.get(k), int | float)}


def collect_summary(
    run_dir: RunDir,
    topology: str,
    ledger: dict[str, Any] | None = None,
    precision: dict[str, dict[str, str]] | None = None,
    serving: dict[str, Any] | None = None,
) -> RunSummary:
    """Gather the run's reports and records into a summary and write ``summary.json``."""
    producer = read_json(run_dir.producer_report) if run_dir.producer_report.is_file() else {}
    trainer = read_json(run_dir.trainer_report) if run_dir.trainer_report.is_file() else {}
    log = TrainedLog(run_dir.trained).read()
    ids = [sid for row in log for sid in row.sample_ids]
    paths = {
        "run_dir": str(run_dir.root),
        "config": str(run_dir.config),
        "metrics": str(run_dir.metrics),
        "trained": str(run_dir.trained),
        "checkpoints": str(run_dir.checkpoints),
        "plots": str(run_dir.plots),
    }
    if run_dir.draft.is_dir():
        paths["draft"] = str(run_dir.draft)
    if run_dir.draft_vllm.is_dir():
        paths["draft-vllm"] = str(run_dir.draft_vllm)
    summary = RunSummary(
        topology=topology,
        steps=log[-1].step if log else 0,
        samples_trained=len(ids),
        distinct_samples=len(set(ids)),
        producer={k: v for k, v in producer.items()},
        trainer={k: v for k, v in trainer.items() if not k.endswith("metrics")},
        first_metrics=_pick(trainer.get("first_metrics", {})),
        final_metrics=_pick(trainer.get("final_metrics", {})),
        paths=paths,
        ledger=dict(ledger or {}),
        precision=dict(precision or {}),
        serving=dict(serving or {}),
    )
    write_json_atomic(run_dir.summary, asdict(summary))
    return summary


def render_summary(summary: RunSummary) -> str:
    """The summary as a few aligned lines of text for the terminal."""
    lines = [f"== dataflow run summary ({summary.topology}) =="]
    lines.append(
        f"steps              {summary.steps}    samples trained {summary.samples_trained} "
        f"({summary.distinct_samples} distinct)"
    )
    if summary.producer:
        p = summary.producer
        lines.append(
            f"producer           {p.get('samples', 0)} samples, {p.get('tokens', 0)} tokens in "
            f"{p.get('seconds', 0):.1f}s = {p.get('tokens_per_s', 0):.0f} tokens/s"
        )
    if summary.trainer:
        t = summary.trainer
        lines.append(
            f"trainer            {t.get('samples', 0)} samples, {t.get('tokens', 0)} tokens in "
            f"{t.get('seconds', 0):.1f}s = {t.get('tokens_per_s', 0):.0f} tokens/s"
        )
    if summary.trainer.get("refused_checkpoints"):
        lines.append(
            f"resumed from       step {summary.trainer.get('resumed_from_step')} "
            "(newer checkpoints refused:)"
        )
        lines.extend(f"  refused          {r}" for r in summary.trainer["refused_checkpoints"])
    for key in HEADLINE:
        if key in summary.final_metrics:
            first = summary.first_metrics.get(key)
            was = f"  (step 1: {first:.4f})" if first is not None else ""
            lines.append(f"{key:<18} {summary.final_metrics[key]:.4f}{was}")
    if summary.ledger:
        counts = ", ".join(f"{k} {v}" for k, v in summary.ledger.items())
        lines.append(f"ledger             {counts}")
    for role, choice in summary.precision.items():
        lines.append(f"{role + ' dtype':<18} {choice['dtype']} ({choice['reason']})")
    for label, result in summary.serving.items():
        per_pos = " / ".join(f"{a:.2f}" for a in result.get("acceptance_per_position", []))
        lines.append(
            f"{label:<18} mean acceptance length {result['mean_acceptance_length']:.2f} at "
            f"k={result['num_speculative_tokens']} ({result['engine']}; per position {per_pos}; "
            f"lossless {result['lossless']})"
        )
    for name, path in summary.paths.items():
        lines.append(f"{name:<18} {path}")
    return "\n".join(lines)
