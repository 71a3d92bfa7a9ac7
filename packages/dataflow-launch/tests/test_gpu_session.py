"""The ``nox -s gpu`` script (``tests/gates/gpu/session.py``) on a machine without CUDA: it must
say ``NOT RUN: <reason>`` and exit 0 (skipped), quickly, touching nothing; and its summary
table lists every step.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "tests" / "gates" / "gpu" / "session.py"


def test_without_cuda_the_session_script_prints_not_run_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == (
        "NOT RUN: no CUDA device (torch.cuda.is_available() is False)"
    ), done.stdout
    assert list(tmp_path.iterdir()) == []  # no work directory, no model built


def test_the_summary_table_lists_every_step(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_session", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_session", module)  # dataclasses look it up there
    spec.loader.exec_module(module)
    rows = [
        module.Row("target built + saved", "ok", "8 layers", 1.25),
        module.Row("EAGLE3 acceptance", "FAIL", "AssertionError: acceptance length 0.90 < 1", 3.0),
    ]
    text = module.table(rows)
    lines = text.splitlines()
    assert lines[1].split("|")[0].strip() == "step" and "result" in lines[1]
    assert any("target built + saved" in x and " ok " in x and "1.2" in x for x in lines)
    assert any("EAGLE3 acceptance" in x and "FAIL" in x for x in lines)
    assert len({len(x) for x in lines}) == 1  # aligned columns
