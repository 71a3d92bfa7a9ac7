"""The main job: ``dataflow-launch demo`` runs to completion (producer and consumer processes,
SQLite ledger, shm:// store) on the trained built-in target, prints the summary, draws the
plots, exports the draft, measures it by speculative decoding before and after training, and its
ledger shows every committed sample trained or dropped.
"""

from __future__ import annotations

import hashlib
import json

from run_helpers import assert_one_error_line, cli, read_jsonl, shm_segments, trained_ids

STEPS = 8


def test_demo_runs_to_completion(tmp_path):
    out = tmp_path / "demo"
    result = cli("demo", "--out", out, "--steps", STEPS, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "== dataflow run summary (disaggregated_online) ==" in result.stdout
    assert f"steps              {STEPS}" in result.stdout
    assert "tokens/s" in result.stdout

    for name in ("loss", "accuracy", "acceptance"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (out / "draft" / "model.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS
    # The demo ends with real speculative decoding of held-out prompts, before and after.
    serving = summary["serving"]
    assert sorted(serving) == ["eval after", "eval before"]
    for label, measured in serving.items():
        assert measured["lossless"], measured
        assert 1.0 <= measured["mean_acceptance_length"] <= 4.0
        assert f"{label:<18} mean acceptance length" in result.stdout
    assert serving["eval before"]["mean_acceptance_length"] < 1.1  # the untrained draft: ~1.0
    assert (out / "plots" / "eval_acceptance.png").is_file()

    ids = trained_ids(out)
    assert len(ids) == len(set(ids)) == STEPS * 4
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # The draft learns: acceptance at the end is well above where it started.
    assert rows[-1]["train/acceptance_rate"] > 1.5 * rows[0]["train/acceptance_rate"]

    status = cli("status", f"sqlite:///{out}/ledger.sqlite", "--json", timeout=60)
    assert status.returncode == 0, status.stderr
    record = json.loads(status.stdout)
    samples = record["samples"]
    assert samples["committed"] == samples["assigned"] == 0
    assert samples["trained"] + samples["released"] + samples["dropped"] == STEPS * 4
    assert record["producer"] == "closed" and record["consumer"] == "done"
    tag = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:10]
    assert shm_segments(f"demo-{tag}") == []

    again = cli("demo", "--out", out, "--steps", STEPS, timeout=60)
    assert_one_error_line(again, "demo", "already holds a run")
