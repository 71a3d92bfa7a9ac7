"""The ``sglang`` engine against a real SGLang server serving the built-in target.

The built-in target is saved as a local model directory; ``python -m sglang.launch_server``
serves it on loopback with hidden-state return; the engine's features for a few demo prompts
are compared with the in-process ``hf`` engine's on the same GPU and weights (bf16 compute in
both, so a tolerance: |Δ| ≤ 0.1 + 5% of the value range per feature, token ids and loss masks
exact). Extra server flags: ``DATAFLOW_SGLANG_SERVER_ARGS`` (space-separated).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from gpu_support import requires_cuda

pytestmark = [
    pytest.mark.gpu,
    requires_cuda,
    pytest.mark.skipif(
        importlib.util.find_spec("sglang") is None,
        reason="NOT RUN: sglang is not installed (pip install 'dataflow-launch[sglang]')",
    ),
]

BUILTIN = {
    "hidden_size": 128,
    "num_layers": 8,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 256,
}


def _save_builtin(directory: Path) -> None:
    from dataflow.launch.builtin.target import build_builtin_target
    from dataflow.launch.config.sections import BuiltinTargetSection

    model, tokenizer = build_builtin_target(BuiltinTargetSection(**BUILTIN), torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@contextlib.contextmanager
def sglang_server(model_dir: Path, port: int, log: Path, draft_dir: Path | None = None):
    extra = os.environ.get("DATAFLOW_SGLANG_SERVER_ARGS", "").split()
    # Full prefill blocks need these (engines/sglang_wire.py); EAGLE3 makes the server return
    # the draft config's aux layers instead of the last hidden state.
    extra += ["--disable-radix-cache", "--chunked-prefill-size", "-1"]
    if draft_dir is not None:
        extra += [
            "--speculative-algorithm",
            "EAGLE3",
            "--speculative-draft-model-path",
            str(draft_dir),
            "--speculative-num-steps",
            "3",
            "--speculative-eagle-topk",
            "1",
            "--speculative-num-draft-tokens",
            "4",
        ]
    cmd = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "bfloat16",
        "--enable-return-hidden-states",
        *extra,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"the SGLang server exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the SGLang server did not come up:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_sglang_engine_features_match_the_hf_engine(tmp_path):
    from dataflow_testing.ports import free_port

    from dataflow.launch.config.sections import DataSection, TargetSection
    from dataflow.launch.data import build_tasks, load_prompts
    from dataflow.launch.engines import open_engine

    model_dir = tmp_path / "target"
    _save_builtin(model_dir)
    hf = open_engine(
        TargetSection(engine="hf", model_dir=str(model_dir), device="cuda", batch_size=2)
    )
    try:
        prompts = load_prompts(DataSection(max_length=96, max_prompts=4), hf.tokenizer)  # type: ignore[attr-defined]
        tasks = build_tasks(
            prompts.prompts, run_id="gpu", passes=1, max_length=96, target_version=hf.info.version
        )
        expected = hf.capture(tasks)
    finally:
        hf.close()
    draft = os.environ.get("DATAFLOW_SGLANG_DRAFT_DIR")
    if not draft:
        pytest.skip(
            "NOT RUN: DATAFLOW_SGLANG_DRAFT_DIR (an EAGLE3 draft of this target whose "
            "eagle_config.eagle_aux_hidden_state_layer_ids are the target's) is not set"
        )
    with (
        sglang_server(model_dir, free_port(), tmp_path / "sglang.log") as url,
        sglang_server(model_dir, free_port(), tmp_path / "sglang-aux.log", Path(draft)) as aux,
    ):
        engine = open_engine(
            TargetSection(
                engine="sglang",
                model_dir=str(model_dir),
                server_url=url,
                aux_server_url=aux,
                batch_size=2,
            )
        )
        try:
            got = engine.capture(tasks)
        finally:
            engine.close()
    assert [s.task_id for s in got] == [s.task_id for s in expected]
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.tensors["input_ids"], b.tensors["input_ids"])
        assert torch.equal(a.tensors["loss_mask"], b.tensors["loss_mask"])
        for name in ("hidden_state", "aux_hidden_state"):
            x, y = a.tensors[name].float().cpu(), b.tensors[name].float().cpu()
            assert x.shape == y.shape, (name, x.shape, y.shape)
            span = float(y.max() - y.min())
            assert float((x - y).abs().max()) <= 0.1 + 0.05 * span, name
