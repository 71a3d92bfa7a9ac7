"""``dataflow-launch eval --engine hf`` on a tiny run's exported draft, the per-engine layer ids
of the export, ``eval``'s refusals and ``target save``.

One tiny colocated offline run (module fixture, the real CLI) gives the exported ``draft/``
(SGLang ids) and ``draft-vllm/`` (vLLM ids); the hf engine's captures say which layers the draft
was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch_helpers import TINY, make_tasks
from run_helpers import EXAMPLES, TINY_RUN, cli, sets

from dataflow.launch.cli.app import main
from dataflow.launch.config import BuiltinTargetSection, load_config

K = 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, str]:
    """``(run_dir, stdout)`` of a 6-step tiny colocated offline run."""
    out = tmp_path_factory.mktemp("eval") / "run"
    result = cli(
        "run",
        EXAMPLES / "colocated_offline.yaml",
        "--no-progress",
        *sets(
            *TINY_RUN,
            f"run.out_dir={out}",
            f"store.uri=file://{out}/features",
            "data.max_prompts=6",
            "data.passes=2",
            "trainer.total_steps=6",
            "target.dtype=auto",
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def _eval(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["eval", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_summary_says_which_dtypes_were_chosen_and_why(tiny_run):
    from dataflow.launch.precision import choose_dtype

    _, stdout = tiny_run
    chosen = choose_dtype("auto", "cpu")
    assert f"target dtype       {chosen.dtype} ({chosen.reason})" in stdout
    assert f"trainer dtype      {chosen.dtype} ({chosen.reason})" in stdout
    assert chosen.reason.startswith("auto: the CPU ")


def test_each_export_selects_the_captured_layers_in_its_engine(tiny_run):
    """vLLM id k = residual stream after k decoder layers = HF hidden_states[k]; SGLang adds 1
    to explicit ids. Both exports must name the hidden_states the hf engine captured."""
    from dataflow.launch.engines.hf import open_hf_engine

    run_dir, _ = tiny_run
    config = load_config(str(run_dir / "config.yaml"), ["target.dtype=float32"])
    engine = open_hf_engine(config.target)
    (task,) = make_tasks(engine, 1)
    (sample,) = engine.capture([task])
    ids = sample.tensors["input_ids"]
    aux = sample.tensors["aux_hidden_state"][0]
    with torch.no_grad():
        states = engine.model(input_ids=ids, output_hidden_states=True).hidden_states
    width = aux.shape[-1] // 3
    captured = []
    for chunk in aux.split(width, dim=-1):
        distances = [float((s[0] - chunk).abs().max()) for s in states]
        best = min(range(len(states)), key=distances.__getitem__)
        assert distances[best] < 1e-5 and sorted(distances)[1] > 1e-3, distances
        captured.append(best)

    def layer_ids(name: str) -> list[int]:
        data = json.loads((run_dir / name / "config.json").read_text())
        return data["eagle_config"]["eagle_aux_hidden_state_layer_ids"]

    assert layer_ids("draft-vllm") == captured
    assert [k + 1 for k in layer_ids("draft")] == captured
    assert captured == [k + 1 for k in engine.info.aux_layer_ids]


def test_eval_hf_is_lossless_and_reports_initial_and_trained_drafts(tiny_run, tmp_path, capsys):
    from dataflow.launch.builders.common import trainer_objective
    from dataflow.train.export import export_draft

    run_dir, _ = tiny_run
    config_path = str(run_dir / "config.yaml")
    initial = export_draft(trainer_objective(load_config(config_path)), tmp_path / "initial")
    plot = tmp_path / "acceptance.png"
    results = {}
    for label, extra in (("initial", ["--draft", str(initial)]), ("trained", [])):
        args = [config_path, *extra, "--engine", "hf", "-k", str(K), "--limit", "2"]
        code, out, err = _eval(capsys, *args, "--max-new-tokens", "8", "--json")
        assert code == 0, err
        results[label] = result = json.loads(out)
        assert result["lossless"] is True and result["mismatched_prompts"] == []
        assert result["engine"] == "hf" and result["num_speculative_tokens"] == K
        assert result["prompts"] == 2 and result["generated_tokens"] > 0
        assert 1.0 <= result["mean_acceptance_length"] <= K + 1
        assert len(result["acceptance_per_position"]) == K
        assert all(0.0 <= a <= 1.0 for a in result["acceptance_per_position"])
        assert result["mean_acceptance_length"] == pytest.approx(
            1 + result["accepted"] / result["drafts"]
        )
    assert results["trained"]["draft"] == str(run_dir / "draft")
    assert results["initial"]["draft"] == str(initial)
    print({k: v["mean_acceptance_length"] for k, v in results.items()})
    code, out, _ = _eval(capsys, config_path, "-k", "2", "--limit", "1", "--plot", str(plot))
    assert code == 0 and "mean acceptance length" in out and "lossless                True" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hf_speculative_output_equals_plain_greedy_generate(tiny_run):
    """Independent of eval's own target-only loop: transformers' greedy ``generate``."""
    from dataflow.launch.evaluate.hf_spec import HFSpecDecoder, SpecCounts
    from dataflow.launch.evaluate.runner import load_eval_prompts
    from dataflow.launch.evaluate.targets import EvalTarget, load_target
    from dataflow.train.export import load_draft

    run_dir, _ = tiny_run
    model, tokenizer = load_target(EvalTarget(builtin=BuiltinTargetSection(**TINY)), torch.float32)
    decoder = HFSpecDecoder(model, load_draft(run_dir / "draft").float(), None)
    (prompt,) = load_eval_prompts(None, tokenizer, limit=1)
    spec = decoder.generate(prompt, 10, K, SpecCounts())
    with torch.no_grad():
        plain = model.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None
        )[0, len(prompt) :].tolist()
    assert spec == plain


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--draft", "{tmp}/nope"], "is not an exported draft (no config.json)"),
        (["{config}", "-k", "0"], "--num-speculative-tokens must be >= 1, got 0"),
        (["{config}", "--prompts", "{tmp}/missing.jsonl"], "missing.jsonl' does not exist"),
        (["{config}", "--target", "{tmp}"], "is not a model directory"),
        ([], "give a run's CONFIG or --draft DIR"),
    ],
)
def test_eval_bad_input_is_one_clear_error_exit_2_nothing_written(
    tiny_run, tmp_path, capsys, args, needle
):
    run_dir, _ = tiny_run
    before = sorted(p.name for p in run_dir.iterdir())
    filled = [a.format(tmp=tmp_path, config=run_dir / "config.yaml") for a in args]
    plot = tmp_path / "plot.png"
    code, out, err = _eval(capsys, *filled, "--plot", str(plot), "--limit", "1")
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dataflow-launch eval: error: "), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
    assert not plot.exists() and list(tmp_path.iterdir()) == []
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_target_save_dir_loads_as_model_dir_with_the_builtin_features(tmp_path, capsys):
    from dataflow.launch.builtin.save import save_builtin_target
    from dataflow.launch.engines.hf import open_hf_engine

    tiny = ["target.dtype=float32", *(f"target.builtin.{k}={v}" for k, v in TINY.items())]
    builtin = load_config(None, tiny).target
    saved = save_builtin_target(builtin.builtin, tmp_path / "tiny", torch.float32)
    from_dir = load_config(None, ["target.dtype=float32", f"target.model_dir={saved}"]).target
    a, b = open_hf_engine(builtin), open_hf_engine(from_dir)
    tasks = make_tasks(a, 2)
    for x, y in zip(a.capture(tasks), b.capture(tasks), strict=True):
        assert x.tensors.keys() == y.tensors.keys()
        for name in x.tensors:
            assert torch.equal(x.tensors[name], y.tensors[name]), name

    # The CLI writes the shipped trained target; the hf engine loads it like the builtin.
    assert main(["target", "save", str(tmp_path / "trained")]) == 0
    assert "saved the built-in target (trained weights)" in capsys.readouterr().out
    config = json.loads((tmp_path / "trained" / "config.json").read_text())
    assert config["hidden_size"] == BuiltinTargetSection(weights="trained").hidden_size
    assert main(["target", "save", str(tmp_path / "trained")]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err


def test_before_after_eval_goes_into_the_summary_and_a_plot(tiny_run, tmp_path):
    """What ``demo --eval`` adds: the run's initial draft and its trained one, both measured."""
    import shutil

    from dataflow.launch.evaluate.before_after import INITIAL_DRAFT, PLOT_FILE, eval_before_after
    from dataflow.launch.run_dir import RunDir
    from dataflow.launch.summary import collect_summary, render_summary

    run_dir, _ = tiny_run
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run_dir, copy.root)
    config = load_config(str(copy.config))
    served = eval_before_after(config, copy, k=2, limit=1, max_new_tokens=6)
    assert list(served) == ["eval before", "eval after"]
    assert served["eval before"]["draft"] == str(copy.root / INITIAL_DRAFT)
    assert served["eval after"]["draft"] == str(copy.draft)
    assert all(r["lossless"] and r["num_speculative_tokens"] == 2 for r in served.values())
    assert (copy.plots / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = render_summary(collect_summary(copy, config.run.topology, serving=served))
    for label, result in served.items():
        line = f"{label:<18} mean acceptance length {result['mean_acceptance_length']:.2f} at k=2"
        assert line in text, text
    assert json.loads((copy.root / "summary.json").read_text())["serving"] == served
