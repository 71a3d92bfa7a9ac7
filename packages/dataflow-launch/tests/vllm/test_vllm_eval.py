"""``eval --engine vllm`` on the demo's export: vLLM's ``eagle3`` method serves the
``draft-vllm/`` that ``dataflow-launch demo`` (its full 300 steps) exported, as written, next to
the trained built-in target saved by ``dataflow-launch target save DIR``; it is lossless, its
mean acceptance length at k = 3 on the shipped held-out prompts is >= 2.0 (an untrained draft
gets 1.0), and ``--engine hf`` on the same prompts and k agrees within ``AGREEMENT_TOLERANCE``.

The demo runs once for this module (``--no-eval``: this test measures the draft itself, about
140 s on 2 cores). ``eval --engine vllm`` runs in the vLLM interpreter (``DATAFLOW_VLLM_PYTHON``
or this one), ``--engine hf`` in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from run_helpers import cli

from dataflow.launch.cli.app import main
from dataflow.launch.cli.demo import DEFAULT_STEPS
from dataflow.launch.evaluate.runner import AGREEMENT_TOLERANCE, default_prompts_path

pytestmark = pytest.mark.vllm

K = 3
MIN_MEAN_ACCEPTANCE_LENGTH = 2.0
"""Issue 13: the demo's draft after its 300 steps, at k = 3 on held-out prompts, in vLLM."""


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory) -> tuple[Path, Path]:
    """``(demo run dir, saved target dir)``: the demo's full run and the built-in target."""
    root = tmp_path_factory.mktemp("vllm-eval")
    demo = root / "demo"
    ran = cli("demo", "--out", demo, "--no-eval", "--no-progress", timeout=1800)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert json.loads((demo / "summary.json").read_text())["steps"] == DEFAULT_STEPS
    target = root / "target"
    saved = cli("target", "save", target, timeout=240)
    assert saved.returncode == 0, saved.stderr[-3000:]
    return demo, target


def eval_in_vllm(python: str, config: Path, target: Path) -> dict:
    """``dataflow-launch eval CONFIG --target DIR --engine vllm`` in the vLLM interpreter
    ``python``."""
    scratch = tempfile.mkdtemp(prefix="vl-", dir="/tmp")
    env = {**os.environ, "TMPDIR": scratch, "VLLM_RPC_BASE_PATH": scratch}
    code = "from dataflow.launch.cli.app import main; raise SystemExit(main(__import__('sys').argv[1:]))"
    args = ["eval", str(config), "--target", str(target), "--engine", "vllm", "-k", str(K)]
    try:
        served = subprocess.run(
            [python, "-c", code, *args, "--json"],
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
            env=env,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert served.returncode == 0, served.stderr[-3000:]
    return json.loads(served.stdout.strip().splitlines()[-1])


def test_vllm_serves_the_demos_export_lossless_and_agrees_with_hf(
    demo_export, server_python, capsys
):
    demo, target = demo_export
    config = demo / "config.yaml"
    vllm = eval_in_vllm(server_python, config, target)
    args = ["eval", str(config), "--target", str(target), "--engine", "hf", "-k", str(K)]
    assert main([*args, "--json"]) == 0
    hf = json.loads(capsys.readouterr().out)
    held_out = [line for line in default_prompts_path().read_text().splitlines() if line.strip()]
    print({"vllm": vllm, "hf": hf})
    # vLLM loaded the demo's draft-vllm/ as exported, next to the saved target.
    assert vllm["draft"] == str(demo / "draft-vllm") and vllm["target"] == str(target)
    assert hf["draft"] == str(demo / "draft") and hf["prompts"] == vllm["prompts"] == len(held_out)
    assert vllm["lossless"] is True and vllm["mismatched_prompts"] == []
    assert hf["lossless"] is True
    assert len(vllm["acceptance_per_position"]) == K and vllm["drafts"] > 0
    assert vllm["mean_acceptance_length"] >= MIN_MEAN_ACCEPTANCE_LENGTH, vllm
    diff = abs(vllm["mean_acceptance_length"] - hf["mean_acceptance_length"])
    assert diff <= AGREEMENT_TOLERANCE, (vllm, hf)
