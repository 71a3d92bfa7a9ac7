"""``producer.regenerate`` through the real CLI: runs train to the end on the target's own
responses, and settings it cannot honour are refused before anything is created."""

from __future__ import annotations

import json
from pathlib import Path

from run_helpers import (
    EXAMPLES,
    TINY_RUN,
    assert_one_error_line,
    cli,
    fresh_shm_name,
    read_jsonl,
    sets,
    shm_segments,
)
from safetensors.torch import load_file

REGEN = ("producer.regenerate=true", "producer.max_new_tokens=8", "data.max_prompts=6")


def run(config: str, out: Path, *overrides: str):
    return cli(
        "run",
        EXAMPLES / f"{config}.yaml",
        *sets(*TINY_RUN, f"run.out_dir={out}", *overrides),
        timeout=240,
    )


def test_colocated_offline_trains_on_the_targets_own_responses(tmp_path, tokenizer):
    from dataflow.launch.config import DataSection
    from dataflow.launch.data import load_prompts

    out = tmp_path / "run"
    features = tmp_path / "features"
    result = run("colocated_offline", out, *REGEN, f"store.uri=file://{features}")
    assert result.returncode == 0, result.stderr
    trained = {sid for row in read_jsonl(out / "trained.jsonl") for sid in row["sample_ids"]}
    files = sorted(features.glob("*.safetensors"))
    assert len(files) == 6 and len(trained) == 6
    prompts = load_prompts(
        DataSection(max_length=48, max_prompts=6), tokenizer, regenerate_tokens=8
    )
    by_index = {i: p.input_ids for i, p in enumerate(prompts.prompts)}
    for path in files:
        sample = load_file(str(path))
        ids, mask = sample["input_ids"][0].tolist(), sample["loss_mask"][0].tolist()
        prompt = list(by_index[int(path.stem.rsplit("-", 1)[1])])
        assert ids[: len(prompt)] == prompt  # the payload was the prompt only
        assert 1 <= len(ids) - len(prompt) <= 8  # the target wrote the rest
        assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    record = json.loads((features / "capture.json").read_text())
    assert record["regeneration"] == {"max_new_tokens": 8, "temperature": 0.0, "seed": 0}


def test_colocated_online_regenerating_run_trains_to_the_end(tmp_path):
    out = tmp_path / "run"
    result = run("colocated_online", out, *REGEN, "producer.temperature=0.7")
    assert result.returncode == 0, result.stderr
    trained = [sid for row in read_jsonl(out / "trained.jsonl") for sid in row["sample_ids"]]
    assert len(trained) == len(set(trained)) == 6


def test_disaggregated_online_regenerating_run_trains_to_the_end(tmp_path):
    out = tmp_path / "run"
    with fresh_shm_name() as name:
        result = run(
            "disaggregated_online",
            out,
            *REGEN,
            f"store.uri=shm://{name}",
            f"ledger.uri=sqlite://{out}/ledger.sqlite",
        )
        assert result.returncode == 0, result.stderr
        assert shm_segments(name) == []
    trained = [sid for row in read_jsonl(out / "trained.jsonl") for sid in row["sample_ids"]]
    assert len(trained) == len(set(trained)) == 6


def test_max_new_tokens_that_leave_no_room_for_a_prompt_are_refused(tmp_path):
    out = tmp_path / "run"
    result = run("colocated_online", out, "producer.regenerate=true", "producer.max_new_tokens=48")
    assert_one_error_line(result, "run", "producer.max_new_tokens", "data.max_length 48")
    assert not out.exists()


def test_max_new_tokens_alone_is_not_checked_without_regenerate(tmp_path):
    from dataflow.launch.config import LaunchConfig

    config = LaunchConfig.model_validate(
        {"data": {"max_length": 16}, "producer": {"max_new_tokens": 64}}
    )
    assert not config.producer.regenerate


def test_regenerate_with_the_sglang_engine_is_refused(tmp_path):
    out = tmp_path / "run"
    result = run(
        "disaggregated_online",
        out,
        *REGEN,
        "target.engine=sglang",
        f"target.model_dir={tmp_path}",
        "target.builtin=null",
        "target.server_url=http://127.0.0.1:1",
        "target.aux_server_url=http://127.0.0.1:2",
    )
    assert_one_error_line(result, "run", "producer.regenerate", "sglang")
    assert not out.exists()


def test_pre_computed_features_are_refused_with_regenerate(tmp_path):
    features = tmp_path / "pre"
    features.mkdir()
    (features / "sample-0.safetensors").write_bytes(b"pre-computed elsewhere")
    out = tmp_path / "run"
    result = run("colocated_offline", out, *REGEN, f"store.uri=file://{features}")
    assert_one_error_line(result, "run", "producer.regenerate", "pre-computed features")
    assert not out.exists()
    assert sorted(p.name for p in features.iterdir()) == ["sample-0.safetensors"]


def test_token_ids_without_a_prompt_prefix_are_refused_naming_the_line(tmp_path):
    data = tmp_path / "ids.jsonl"
    data.write_text(json.dumps({"input_ids": [5, 6, 7]}) + "\n")
    out = tmp_path / "run"
    result = run("colocated_online", out, *REGEN, f"data.path={data}", "data.format=token_ids")
    assert_one_error_line(result, "run", "line 1", "producer.regenerate needs a loss_mask")
    assert not out.exists()
