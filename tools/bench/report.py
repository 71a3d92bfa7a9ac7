"""``docs/benchmarks.md`` from the benchmarks' JSON results: targets, every ratio, the machine."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from machine import SIMD_FLAGS, Machine


@dataclass(frozen=True)
class Target:
    """One target of an issue and what this run measured for it."""

    issue: int
    what: str
    measured: str
    met: bool | None  # None: the benchmark did not produce the figure

    @property
    def verdict(self) -> str:
        return "no result" if self.met is None else ("met" if self.met else "**not met**")


def _result(outcomes: Sequence[Any], name: str) -> dict[str, Any] | None:
    for outcome in outcomes:
        if outcome.name == name:
            return outcome.result
    return None


def _store_targets(store: dict[str, Any] | None) -> list[Target]:
    if store is None:
        return [Target(3, "shm:// and dir:// vs their baselines", "-", None)]
    out = []
    for row in store["rows"]:
        if row.get("target") is None:
            continue
        relation = row.get("relation", ">=")
        if relation == "<=":  # a cost: store time / baseline time (issue 15)
            what = f"{row['name']} <= {row['target']:g}x {row['baseline']}"
            met = row["ratio"] <= row["target"]
            out.append(Target(15, what, f"{row['ratio']:.2f}x", met))
            continue
        what = f"{row['name']} on {row['where']} >= {row['target']}x {row['baseline']}"
        out.append(Target(3, what, f"{row['ratio']:.2f}x", row["ratio"] >= row["target"]))
    return out


def _mooncake_targets(mooncake: dict[str, Any] | None) -> list[Target]:
    if mooncake is None:
        return [Target(3, "mooncake:// >= 0.7x bare put_from/get_into", "-", None)]
    target = mooncake.get("target_ratio", 0.7)
    rows = [r for r in mooncake["rows"] if r.get("ratio") is not None]
    return [
        Target(
            3,
            f"{r['path']} >= {target}x bare put_from/get_into",
            f"{r['ratio']:.2f}x",
            r["ratio"] >= target,
        )
        for r in rows
    ]


def _hot_path_targets(hot: dict[str, Any] | None) -> list[Target]:
    if hot is None:
        return [
            Target(15, "memory:// put+get+release <= 50 us per sample", "-", None),
            Target(15, "dir:// get no slower than SpecForge's shared-dir get", "-", None),
        ]
    mem = hot["memory"]
    out = [
        Target(
            15,
            f"memory:// put+get+release <= {mem['target_us']:g} us per sample (CPU time, "
            f"in-process; {mem['baseline']}: {mem['baseline_us_per_sample']:.2f} us)",
            f"{mem['us_per_sample']:.1f} us",
            bool(mem["met"]),
        )
    ]
    for row in hot["dir"]:
        out.append(
            Target(
                15,
                f"{row['name']} >= {row['target']}x the speed of {row['baseline']}",
                f"{row['ratio']:.2f}x ({row['ms']:.1f} vs {row['baseline_ms']:.1f} ms)",
                bool(row["met"]),
            )
        )
    return out


def _loader_targets(loader: dict[str, Any] | None) -> list[Target]:
    what = "loader overhead <= {} us per sample beyond a bare stack loop ({})"
    if loader is None:
        return [Target(15, what.format(20, "every mode"), "-", None)]
    return [
        Target(
            15,
            what.format(loader["target_us"], row["case"]),
            f"{row['overhead_us']:.1f} us",
            bool(row["met"]),
        )
        for row in loader["rows"]
    ]


def _control_targets(control: dict[str, Any] | None) -> list[Target]:
    if control is None:
        return [Target(4, "ledger throughput on SQLite", "-", None)]
    out = []
    for name, v in control["targets"].items():
        growth = "100k/10k" in name
        ratio = growth or " / " in name
        relation = "<=" if growth or "us/ref" in name else ">="  # a cost: lower is better
        if ratio:
            value, target = f"{v['value']:.2f}x", f"{v['target']}x"
        else:
            unit = name.rsplit(" ", 1)[-1]  # e.g. refs/s
            value, target = f"{v['value']:,.0f} {unit}", f"{v['target']:,.0f}"
            if v.get("baselines"):  # same-run raw figures, e.g. raw sqlite3 on the same disk
                value += (
                    " (same run: "
                    + ", ".join(
                        f"{k} {b:,.0f} {unit}, {v['value'] / b:.2f}x"
                        for k, b in v["baselines"].items()
                    )
                    + ")"
                )
        issue = 15 if "pipeline" in name or "us/ref" in name else 4  # issue 15 set these two
        out.append(Target(issue, f"{name} {relation} {target}", value, bool(v["met"])))
    return out


def _train_targets(train: dict[str, Any] | None) -> list[Target]:
    if train is None:
        return [Target(5, "trainer step time <= 1.05x a bare PyTorch loop", "-", None)]
    limit = train["max_ratio"]
    cpu, wall = train["cpu_overhead_ratio"], train["wall_overhead_ratio"]
    return [
        Target(
            5,
            f"trainer step time <= {limit}x a bare PyTorch loop (CPU time per step, "
            "median of lockstep step pairs)",
            f"{cpu:.3f}x{_spread_note(train)} (wall {wall:.3f}x)",
            cpu <= limit,
        )
    ]


def _spread_note(result: dict[str, Any]) -> str:
    """`` IQR [a, b], n pairs, load x-y`` where the benchmark reported its spread and load."""
    spread = result.get("ratio_spread", {}).get("cpu")
    load = result.get("load")
    note = ""
    if spread:
        note += f", IQR [{spread['q1']:.3f}, {spread['q3']:.3f}], {spread['n']} pairs"
    if load:
        note += f", load {load['min']:.1f}-{load['max']:.1f}"
    return f" ({note[2:]})" if note else ""


def _plane_targets(plane: dict[str, Any] | None) -> list[Target]:
    what = "colocated plane (local_colocated) <= {}x a bare PyTorch loop (CPU time per step)"
    if plane is None:
        return [Target(14, what.format(1.01), "-", None)]
    limit = plane["max_ratio"]
    cpu, wall = plane["cpu_overhead_ratio"], plane["wall_overhead_ratio"]
    measured = f"{cpu:.3f}x{_spread_note(plane)} (wall {wall:.3f}x)"
    out = [Target(14, what.format(limit), measured, cpu <= limit)]
    if plane.get("attributed_cpu_ratio") is not None:
        attributed = plane["attributed_cpu_ratio"]
        out.append(
            Target(
                14,
                f"colocated plane's own calls (loader next, ledger ack) <= {limit}x: 1 + their "
                "CPU time / the bare step's",
                f"{attributed:.4f}x ({plane['plane_cpu_ms_per_step']:.2f} ms per step)",
                attributed <= limit,
            )
        )
    return out


def _e2e_targets(e2e: dict[str, Any] | None) -> list[Target]:
    if e2e is None:
        return [Target(7, "interleaved wall <= 1.15x the slower stage alone", "-", None)]
    return [
        Target(
            7,
            f"interleaved wall <= {e2e['overlap_target']}x the slower stage alone "
            "(one core per role)",
            f"{e2e['overlap_ratio']:.2f}x",
            bool(e2e["overlap_met"]),
        )
    ]


def _engines_targets(engines: dict[str, Any] | None) -> list[Target]:
    if engines is None:
        return [
            Target(11, "vllm capture <= 1.25x the same server without capture", "-", None),
            Target(15, "producer <= 1.25x the same engine's bare forward (vllm, hf)", "-", None),
            Target(11, "vllm store mode >= 1.5x faster per sample than file mode", "-", None),
        ]
    out = []
    for row in engines["rows"]:
        if row.get("target") is None:
            continue
        issue = 11 if row["name"].startswith("vllm capture") else 15
        what = f"{row['name']} <= {row['target']}x (CPU time)"
        out.append(Target(issue, what, f"{row['ratio']:.2f}x", bool(row["met"])))
    modes = engines.get("store_vs_file") or {}
    what = "vllm store mode >= {}x faster per sample than file mode".format(
        modes.get("target_ratio", 1.5)
    )
    if modes.get("ratio") is None:
        out.append(Target(11, what, modes.get("note", "not measured"), None))
    else:
        met = modes["ratio"] >= modes.get("target_ratio", 1.5)
        value = f"{modes['ratio']:.2f}x"
        if modes.get("verdict_workload"):
            value += f" on the {modes['verdict_workload']} workload"
            if modes.get("default_ratio") is not None:
                value += f" (default workload: {modes['default_ratio']:.2f}x)"
        out.append(Target(11, what, value, met))
    return out


def _engines_ratios(engines: dict[str, Any] | None) -> list[str]:
    lines = []
    for row in (engines or {}).get("rows", []):
        lines.append(f"| engines | {row['name']}, CPU s | {row['ratio']:.2f}x |")
        if row.get("wall_ratio") is not None:
            lines.append(f"| engines | {row['name']}, wall s | {row['wall_ratio']:.2f}x |")
    modes = (engines or {}).get("store_vs_file") or {}
    rows = modes.get("workloads") or ({"": modes} if modes.get("ratio") is not None else {})
    for name, row in rows.items():
        if row.get("ratio") is None:
            continue
        what = "vllm file mode / store mode, time per sample"
        if name:
            load = row.get("load_avg") or [0.0]
            what += (
                f", {name} workload ({row['tokens']} tokens, H={row['hidden']}, "
                f"{row['bytes_per_sample'] / 2**20:.1f} MiB/sample: file "
                f"{row['file_s_per_sample'] * 1e3:.0f} ms, store "
                f"{row['store_s_per_sample'] * 1e3:.0f} ms, bare request "
                f"{row['bare_s_per_sample'] * 1e3:.0f} ms; load {load[0]:.1f})"
            )
        lines.append(f"| engines | {what} | {row['ratio']:.2f}x |")
    return lines


def _ratios(outcomes: Sequence[Any]) -> list[str]:
    lines = ["| benchmark | ratio | value |", "|---|---|---:|"]
    store = _result(outcomes, "store")
    for row in (store or {}).get("rows", []):
        if row.get("ratio") is not None:
            kind = "time" if row.get("relation") == "<=" else "speed"
            lines.append(
                f"| store | {row['name']} ({row['where']}) / {row['baseline']} {kind} "
                f"| {row['ratio']:.2f}x |"
            )
    mooncake = _result(outcomes, "mooncake")
    for row in (mooncake or {}).get("rows", []):
        if row.get("ratio") is not None:
            lines.append(
                f"| mooncake | {row['path']} / bare put_from+get_into speed | {row['ratio']:.2f}x |"
            )
    hot = _result(outcomes, "store-hot-paths")
    for row in (hot or {}).get("dir", []):
        lines.append(f"| store | {row['name']} / {row['baseline']} speed | {row['ratio']:.2f}x |")
    loader = _result(outcomes, "loader")
    for row in (loader or {}).get("rows", []):
        lines.append(
            f"| loader | loader / bare stack loop, CPU s per sample ({row['case']}) "
            f"| {row['ratio']:.2f}x |"
        )
    control = _result(outcomes, "control")
    for name, value in (control or {}).get("ratios", {}).items():
        lines.append(f"| control | {name} | {value:.2f}x |")
    for name, value in (control or {}).get("status_growth", {}).items():
        lines.append(f"| control | {name} status() time, 100k rows / 10k rows | {value:.2f}x |")
    train = _result(outcomes, "train")
    if train:
        lines.append(
            f"| train | Trainer / bare loop, CPU s per step | {train['cpu_overhead_ratio']:.3f}x |"
        )
        lines.append(
            f"| train | Trainer / bare loop, wall s per step | {train['wall_overhead_ratio']:.3f}x |"
        )
    plane = _result(outcomes, "plane")
    if plane:
        lines.append(
            "| plane | bare loop over the colocated plane / bare loop, CPU s per step "
            f"| {plane['cpu_overhead_ratio']:.3f}x |"
        )
        lines.append(
            "| plane | bare loop over the colocated plane / bare loop, wall s per step "
            f"| {plane['wall_overhead_ratio']:.3f}x |"
        )
    e2e = _result(outcomes, "e2e")
    if e2e:
        for label, figures in (("one core per role", e2e), ("shared cores", e2e.get("shared"))):
            if not figures:
                continue
            lines.append(
                f"| e2e | interleaved wall / slower stage alone ({label}) "
                f"| {figures['overlap_ratio']:.2f}x |"
            )
            lines.append(
                f"| e2e | drain-then-fit wall / interleaved wall ({label}) "
                f"| {figures['speedup_vs_drain_then_fit']:.2f}x |"
            )
    lines += _engines_ratios(_result(outcomes, "engines"))
    return lines


def _engines_details(engines: dict[str, Any]) -> list[str]:
    load = engines["load"]
    startup = engines.get("server_startup_s")
    started = "not started" if startup is None else f"started in {startup:.0f} s"
    lines = [
        f"Workload: {engines['prompts']} prompts of {engines['tokens_per_prompt']} tokens, "
        f"{engines['rounds']} paired rounds (every path once per round, same prompts), the "
        "trained built-in target (fp32) on a real vLLM CPU server (eager, managed by the vllm "
        f"engine; {started}) and in-process (hf, every path in a fresh thread, "
        f"{engines['torch_threads']} torch threads), {engines['batch_size']} requests or rows "
        "at a time. Ratios are medians of per-round ratios of CPU time (this process, plus the "
        "server's process group on the vllm paths; wall-time ratios beside them); 1-minute load "
        f"{load['start']:.1f} at the start, {load['end']:.1f} at the end, at most "
        f"{load['max']:.1f}. The bare hf forward is the whole causal LM with "
        "`output_hidden_states` (LM head and every layer's output), so the hf capture, which "
        "runs the decoder stack with hooks on its aux layers, can be cheaper than it.",
        "",
        "| path | tokens/s (wall, median round) |",
        "|---|---:|",
    ]
    for name, value in engines["tokens_per_s"].items():
        lines.append(f"| {name} | {value:,.0f} |")
    return lines


def _e2e_details(e2e: dict[str, Any]) -> list[str]:
    samples = e2e["interleaved"]["samples"]
    lines = [
        f"Workload: `dataflow-launch demo`'s config, {e2e['steps']} optimizer steps "
        f"({samples} samples), flow watermarks raised to the whole run so the producer can "
        "also run alone; each role a real process (SQLite ledger, `shm://` store), one torch "
        "thread each. In production each role has its own device, so the target is read with "
        "each role pinned to its own core (producer CPU 0, trainer CPU 1, in both modes); the "
        "same runs with both roles free to use every core are shown below it.",
        "",
        "| placement | mode | wall s | produce s | train s | trainer idle |",
        "|---|---|---:|---:|---:|---:|",
    ]
    placements = [("one core per role", e2e)]
    if e2e.get("shared"):
        placements.append(("shared cores", e2e["shared"]))
    for label, figures in placements:
        for mode in ("drain_then_fit", "interleaved"):
            m = figures[mode]
            lines.append(
                f"| {label} | {mode.replace('_', '-')} | {m['wall_s']:.1f} | {m['produce_s']:.1f} "
                f"| {m['train_s']:.1f} | {m['trainer_idle_fraction']:.1%} |"
            )
    lines.append("")
    for label, figures in placements:
        lines.append(
            f"{label}: slower stage alone {figures['slower_stage_alone_s']:.1f} s; overlap ratio "
            f"{figures['overlap_ratio']:.2f}x."
        )
    lines += [
        "",
        f"Target <= {e2e['overlap_target']}x, read on one core per role. Trainer idle = sum of "
        "`data_wait_s` / sum of `step_time_s` in its metrics.jsonl.",
    ]
    return lines


def render(
    outcomes: Sequence[Any],
    machine: Machine,
    started: dt.datetime,
    finished: dt.datetime,
    load: tuple[float, float],
    *,
    quick: bool = False,
) -> str:
    """The whole document (Markdown)."""
    targets = [
        *_store_targets(_result(outcomes, "store")),
        *_mooncake_targets(_result(outcomes, "mooncake")),
        *_hot_path_targets(_result(outcomes, "store-hot-paths")),
        *_control_targets(_result(outcomes, "control")),
        *_train_targets(_result(outcomes, "train")),
        *_loader_targets(_result(outcomes, "loader")),
        *_plane_targets(_result(outcomes, "plane")),
        *_e2e_targets(_result(outcomes, "e2e")),
        *_engines_targets(_result(outcomes, "engines")),
    ]
    met = sum(1 for t in targets if t.met)
    lines = [
        "# Benchmarks",
        "",
        "Generated by `nox -s bench` (`tools/bench/run_benchmarks.py`); do not edit by hand.",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} - {finished:%H:%M} UTC"
        + (" (**quick smoke run: fewer repeats**)" if quick else ""),
        f"- Machine: {machine.cpus} CPU cores ({machine.cpu_model}), "
        f"{machine.memory_gib:.1f} GiB memory, Linux {machine.kernel}",
        f"- CPU flags: {', '.join(machine.cpu_flags) or 'none of ' + ', '.join(SIMD_FLAGS)} "
        f"(torch dispatches to {machine.torch_capability}; bf16 is native only with "
        "avx512_bf16 or amx_bf16)",
        f"- Software: Python {machine.python}, torch {machine.torch}",
        f"- Load: 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end. "
        "This machine is shared with other jobs while the benchmarks run, so absolute figures "
        "and wall-clock ratios are noisy; every ratio compares against a baseline measured in "
        "the same run, under the same load.",
        "",
        f"## Targets (issues 3-7, 11, 14, 15): {met} of {len(targets)} met",
        "",
        "| issue | target | measured | verdict |",
        "|---|---|---:|---|",
        *(f"| {t.issue} | {t.what} | {t.measured} | {t.verdict} |" for t in targets),
        "",
        "Issue 6 sets no performance target (the demo's wall time is in the end-to-end "
        "section). The equivalence gates of issue 7 are correctness gates (`nox -s equivalence`). "
        "Issue 14's plane figure (`bench_plane.py`) runs the bare loop fed through the "
        "`local_colocated` plane (samples put in a consume-once `memory://` store, refs committed "
        "to a `memory://` ledger untimed; timed: window dispatch, rank queue, loader get/collate/"
        "release, the ledger ack with `on_ack` release) against the same bare loop over batches "
        "already in memory, the two stepped in lockstep (one ratio per adjacent step pair, "
        "median over pairs, quartiles and load beside it; the second row times the plane's own "
        "calls); the Trainer's own cost is the issue 5 row, measured the same way (a bare step "
        "after every Trainer step).",
        "",
        "## Every ratio",
        "",
        *_ratios(outcomes),
        "",
    ]
    e2e = _result(outcomes, "e2e")
    if e2e:
        lines += ["## End to end: interleaved vs drain-then-fit", "", *_e2e_details(e2e), ""]
    engines = _result(outcomes, "engines")
    if engines:
        lines += ["## Engines: capture vs bare forward", "", *_engines_details(engines), ""]
    lines += ["## Details", "", "| benchmark | command | seconds | outcome |", "|---|---|---:|---|"]
    for o in outcomes:
        state = "ok" if o.result is not None else f"FAILED: {(o.error or '')[:200]}"
        lines.append(f"| {o.name} | `{' '.join(o.command)}` | {o.seconds:.0f} | {state} |")
    lines.append("")
    return "\n".join(lines)
