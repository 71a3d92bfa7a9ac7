"""How ``status`` presents a ``LedgerStatus``: one JSON record, or tables for people."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from dataflow.contracts.states import LedgerStatus, PromptState, SampleState


def status_record(uri: str, status: LedgerStatus) -> dict[str, Any]:
    """The JSON form of a ledger's status (plain types only; steps are -1 when none yet).

    Keys: ``ledger``, ``backend``, ``durable``, ``run_id``, ``samples`` and ``prompts`` (every
    state, zeros included), ``dropped_reasons``, ``backlog``, ``in_flight``,
    ``in_flight_bytes``, ``quantum``, ``durable_step``, ``trained_step``, ``released_through``,
    ``producer``/``consumer`` (state) with ``producer_reason``/``consumer_reason``,
    ``latest_weight_order`` and ``drift`` (``mean``/``max`` lag, null when not tracked).
    """
    markers = status.markers
    return {
        "ledger": uri,
        "backend": status.backend,
        "durable": status.durable,
        "run_id": markers.run_id,
        "samples": {s.value: status.samples.get(s.value, 0) for s in SampleState},
        "prompts": {p.value: status.prompts.get(p.value, 0) for p in PromptState},
        "dropped_reasons": dict(sorted(status.dropped_reasons.items())),
        "backlog": status.backlog,
        "in_flight": status.in_flight,
        "in_flight_bytes": status.in_flight_bytes,
        "quantum": markers.quantum,
        "durable_step": markers.durable_step,
        "trained_step": markers.trained_step,
        "released_through": markers.released_through,
        "producer": markers.producer.value,
        "producer_reason": markers.producer_reason,
        "consumer": markers.consumer.value,
        "consumer_reason": markers.consumer_reason,
        "latest_weight_order": status.latest_weight_order,
        "drift": {"mean": status.drift_mean, "max": status.drift_max},
    }


def _step(step: int) -> str:
    return "none yet" if step < 0 else str(step)


def _bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit} ({count} B)"


def _marker(state: str, reason: str) -> str:
    return f"{state} ({reason})" if reason else state


def _counts(title: str, counts: dict[str, int]) -> Table:
    table = Table(title=title, title_justify="left")
    for name in counts:
        table.add_column(name, justify="right")
    table.add_row(*(str(n) for n in counts.values()))
    return table


def render_table(uri: str, status: LedgerStatus, console: Console | None = None) -> None:
    """Print the status as tables: samples, prompts, then the run's markers and flow figures."""
    out = console if console is not None else Console(highlight=False)
    record = status_record(uri, status)
    durable = "durable" if status.durable else "not durable"
    title = f"ledger {uri} ({status.backend}, {durable}), run {record['run_id'] or '(none)'}"
    out.print(title, soft_wrap=True, markup=False)
    out.print(_counts("samples", record["samples"]))
    out.print(_counts("prompts", record["prompts"]))
    run = Table(title="run", title_justify="left", show_header=False)
    run.add_column("field")
    run.add_column("value")
    drift = record["drift"]
    rows = (
        ("producer", _marker(record["producer"], record["producer_reason"])),
        ("consumer", _marker(record["consumer"], record["consumer_reason"])),
        ("quantum", str(record["quantum"]) if record["quantum"] else "not set"),
        ("durable_step", _step(record["durable_step"])),
        ("trained_step", _step(record["trained_step"])),
        ("released_through", _step(record["released_through"])),
        ("backlog", str(record["backlog"])),
        ("in_flight", str(record["in_flight"])),
        ("in_flight_bytes", _bytes(record["in_flight_bytes"])),
        (
            "dropped reasons",
            ", ".join(f"{k}={v}" for k, v in record["dropped_reasons"].items()) or "none",
        ),
        (
            "drift",
            "not tracked by the ledger"
            if drift["mean"] is None
            else f"mean lag {drift['mean']:.2f}, max lag {drift['max']}",
        ),
        ("weights published", str(record["latest_weight_order"])),
    )
    for name, value in rows:
        run.add_row(name, Text(value))  # Text: reasons are shown as written, never as markup
    out.print(run)
