"""``nox -s gpu``: the whole GPU check as ONE script, at most 10 minutes on one GPU, no downloads.

Steps (each timed; one summary table at the end answers everything):

1. **target** — the built-in LLaMA target (8 layers, H=256, 4 heads of 64, bf16) built from its
   seed and saved as an ordinary local model directory (nothing is downloaded).
2. **hf features** — the in-process ``hf`` engine on CUDA in bf16 captures the four EAGLE3
   features of 8 demo prompts (the reference; saved for the trainer).
3. **trainer NCCL bf16** — ``torchrun`` (one rank, NCCL, FSDP2 bf16 with fp32 master weights)
   trains the draft on those features (:mod:`session_train`); reports samples/s, tokens/s and
   MFU = 6 · trainable parameters · tokens · ttt_length / (seconds · peak bf16 FLOP/s), the
   peak from ``DATAFLOW_GPU_PEAK_TFLOPS`` or the device name (H100/H200: 989 dense bf16
   TFLOP/s; A100: 312) — an estimate that counts the draft's matmuls only. It exports the draft
   in SGLang's EAGLE3 format.
4. **SGLang servers** — two real stock SGLang servers on the saved target, started together:
   a plain one and one running ``--speculative-algorithm EAGLE3`` with
   ``--speculative-draft-model-path`` the exported draft (whose
   ``eagle_aux_hidden_state_layer_ids`` are the target's aux layers), both with
   ``--enable-return-hidden-states --disable-radix-cache --chunked-prefill-size -1`` (see
   ``dataflow.launch.engines.sglang_wire`` for why each flag).
5. **sglang vs hf features** — the ``sglang`` engine (``capture: response``) captures the same
   prompts; token ids and loss masks must be equal, and per hidden feature
   max |sglang - hf| <= 0.1 + 0.05 * (max - min of the hf values): both compute in bf16
   (2⁻⁸ relative rounding per op) with different kernels over 8 layers.
6. **EAGLE3 acceptance** — greedy ``/generate`` of 64 tokens per prompt on the EAGLE3 server;
   acceptance length = Σ completion_tokens / Σ ``meta_info.spec_verify_ct`` (SGLang's own
   ``spec_accept_length`` rule, ``tokenizer_manager.py``). Must be ≥ 1 (a verify step always
   yields the target's token); its value is reported, not gated (the draft trained seconds).

Without CUDA it prints ``NOT RUN: <reason>`` and exits 0 (the nox session then skips). Exit 1
when a step fails (the table says which). ``DATAFLOW_SGLANG_SERVER_ARGS`` adds server flags.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUDGET_S = 600.0
PROMPTS = 8
MAX_LENGTH = 128
NO_CUDA = "NOT RUN: no CUDA device (torch.cuda.is_available() is False)"
EAGLE3_FLAGS = (
    "--speculative-algorithm",
    "EAGLE3",
    "--speculative-num-steps",
    "3",
    "--speculative-eagle-topk",
    "1",
    "--speculative-num-draft-tokens",
    "4",
)
CAPTURE_FLAGS = ("--enable-return-hidden-states", "--disable-radix-cache")


@dataclass
class Row:
    """One line of the summary table."""

    step: str
    result: str  # ok / FAIL / NOT RUN
    figure: str
    seconds: float


def not_run_reason() -> str | None:
    """Why the GPU path cannot run here (None when it can)."""
    try:
        import torch
    except ImportError:
        return "NOT RUN: torch is not installed"
    if not torch.cuda.is_available():
        return NO_CUDA
    return None


def table(rows: list[Row]) -> str:
    """The summary table, one row per step."""
    head = ("step", "result", "figure", "s")
    cells = [head] + [(r.step, r.result, r.figure, f"{r.seconds:.1f}") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [line]
    for i, c in enumerate(cells):
        out.append("|".join(f" {v:<{w}} " for v, w in zip(c, widths, strict=True)))
        if i == 0:
            out.append(line)
    out.append(line)
    return "\n".join(out)


class Session:
    """Runs steps against one deadline; a failed step fails every step that needs it."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.rows: list[Row] = []
        self.deadline = time.monotonic() + BUDGET_S

    def left(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def step(self, name: str, fn: Callable[[], tuple[Any, str]], needs: bool = True) -> Any:
        if not needs:
            self.rows.append(Row(name, "NOT RUN", "an earlier step failed", 0.0))
            return None
        start = time.monotonic()
        try:
            value, figure = fn()
        except Exception as exc:
            traceback.print_exc()
            self.rows.append(Row(name, "FAIL", f"{type(exc).__name__}: {exc}"[:160], 0.0))
            self.rows[-1].seconds = time.monotonic() - start
            return None
        self.rows.append(Row(name, "ok", figure, time.monotonic() - start))
        return value if value is not None else True


# ------------------------------------------------------------------------------------ steps


def save_target(directory: Path) -> tuple[Path, str]:
    import torch

    from dataflow.launch.builtin.target import build_builtin_target
    from dataflow.launch.config.sections import BuiltinTargetSection

    section = BuiltinTargetSection()
    model, tokenizer = build_builtin_target(section, torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    figure = f"{section.num_layers} layers, H={section.hidden_size}, bf16, {directory.name}/"
    return directory, figure


def launch_config(work: Path, model_dir: Path) -> dict[str, Any]:
    return {
        "run": {"id": "gpu-session", "out_dir": str(work / "run"), "seed": 0},
        "target": {
            "engine": "hf",
            "model_dir": str(model_dir),
            "dtype": "bfloat16",
            "device": "cuda",
            "batch_size": 4,
        },
        "data": {"max_prompts": PROMPTS, "max_length": MAX_LENGTH},
        "trainer": {"ttt_length": 3, "bf16": True, "lr": 1e-3, "warmup_steps": 2},
    }


def hf_features(work: Path, model_dir: Path) -> tuple[tuple[list[Any], list[Any]], str]:
    from safetensors.torch import save_file

    from dataflow.launch.config import TargetSection
    from dataflow.launch.config.sections import DataSection
    from dataflow.launch.data import build_tasks, load_prompts
    from dataflow.launch.engines import open_engine

    target = launch_config(work, model_dir)["target"]
    engine = open_engine(TargetSection(**target))
    try:
        prompts = load_prompts(
            DataSection(max_prompts=PROMPTS, max_length=MAX_LENGTH),
            engine.tokenizer,  # type: ignore[attr-defined]
        )
        tasks = build_tasks(
            prompts.prompts,
            run_id="gpu",
            passes=1,
            max_length=MAX_LENGTH,
            target_version=engine.info.version,
        )
        samples = engine.capture(tasks)
    finally:
        engine.close()
    out = work / "features"
    out.mkdir()
    for s in samples:
        save_file(
            {k: v.contiguous().cpu() for k, v in s.tensors.items()},
            str(out / f"{s.task_id}.safetensors"),
        )
    tokens = sum(s.num_tokens for s in samples)
    return (tasks, samples), f"{len(samples)} samples, {tokens} tokens"


def train(session: Session, model_dir: Path) -> tuple[Path, str]:
    work = session.work
    (work / "config.json").write_text(json.dumps(launch_config(work, model_dir)))
    log = work / "train.log"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=1",
        str(HERE / "session_train.py"),
        str(work),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()}
    with log.open("wb") as out:
        done = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=min(240, session.left())
        )
    if done.returncode != 0:
        raise RuntimeError(f"trainer exited {done.returncode}: {log.read_text()[-1500:]}")
    result = json.loads((work / "train_result.json").read_text())
    mfu = f"{100 * result['mfu']:.2f}%" if result.get("mfu") is not None else "n/a (peak unknown)"
    figure = (
        f"{result['samples_per_s']:.1f} samples/s, {result['tokens_per_s']:.0f} tok/s, MFU {mfu}, "
        f"loss {result['loss_first']:.3f}->{result['loss_last']:.3f}, master {result['dtypes']}"
    )
    return work / "draft", figure


def _pythonpath() -> str:
    return os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def sglang_servers(session: Session, model_dir: Path, draft: Path) -> Iterator[tuple[str, str]]:
    """A plain and an EAGLE3 SGLang server on the target, started together; yields their URLs."""
    extra = os.environ.get("DATAFLOW_SGLANG_SERVER_ARGS", "").split()
    common = [
        "--model-path",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--dtype",
        "bfloat16",
        *CAPTURE_FLAGS,
        "--chunked-prefill-size",
        "-1",
        "--mem-fraction-static",
        "0.3",
        "--disable-cuda-graph",
        *extra,
    ]
    specs = {
        "plain": common,
        "eagle3": [*common, *EAGLE3_FLAGS, "--speculative-draft-model-path", str(draft)],
    }
    procs: dict[str, tuple[subprocess.Popen[bytes], str, Path]] = {}
    try:
        for name, args in specs.items():
            port = _free_port()
            log = session.work / f"sglang-{name}.log"
            cmd = [sys.executable, "-m", "sglang.launch_server", *args, "--port", str(port)]
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            procs[name] = (proc, f"http://127.0.0.1:{port}", log)
        for name, (proc, url, log) in procs.items():
            _wait_healthy(session, name, proc, url, log)
        yield procs["plain"][1], procs["eagle3"][1]
    finally:
        for proc, _, _ in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
        for proc, _, _ in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                proc.wait()


def _wait_healthy(
    session: Session, name: str, proc: subprocess.Popen[bytes], url: str, log: Path
) -> None:
    deadline = time.monotonic() + min(360.0, session.left())
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"SGLang {name} server exited {proc.returncode}: {log.read_text()[-1500:]}"
            )
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/health", timeout=5) as answer,
        ):
            if answer.status == 200:
                return
        time.sleep(2)
    raise TimeoutError(f"SGLang {name} server not healthy in time: {log.read_text()[-1500:]}")


def compare(model_dir: Path, urls: tuple[str, str], reference: tuple[list[Any], list[Any]]):
    import torch

    from dataflow.launch.config import TargetSection
    from dataflow.launch.engines import open_engine

    tasks, expected = reference
    engine = open_engine(
        TargetSection(
            engine="sglang",
            model_dir=str(model_dir),
            server_url=urls[0],
            aux_server_url=urls[1],
            batch_size=4,
        )
    )
    try:
        got = engine.capture(tasks)
    finally:
        engine.close()
    worst: dict[str, float] = {"hidden_state": 0.0, "aux_hidden_state": 0.0}
    for a, b in zip(got, expected, strict=True):
        for name in ("input_ids", "loss_mask"):
            if not torch.equal(a.tensors[name].cpu(), b.tensors[name].cpu()):
                raise AssertionError(f"{a.task_id}: {name} differs")
        for name in worst:
            x, y = a.tensors[name].float().cpu(), b.tensors[name].float().cpu()
            if x.shape != y.shape:
                raise AssertionError(f"{a.task_id}: {name} {list(x.shape)} != {list(y.shape)}")
            allowed = 0.1 + 0.05 * float(y.max() - y.min())
            delta = float((x - y).abs().max())
            if delta > allowed:
                raise AssertionError(f"{a.task_id}: {name} max|Δ| {delta:.4f} > {allowed:.4f}")
            worst[name] = max(worst[name], delta / allowed)
    figure = ", ".join(f"{n} max|Δ| ≤ {100 * w:.0f}% of tol" for n, w in worst.items())
    return None, figure


def acceptance(url: str, reference: tuple[list[Any], list[Any]]) -> tuple[float, str]:
    tasks, _ = reference
    body = {
        "input_ids": [list(t.payload["input_ids"])[:64] for t in tasks],
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 64, "ignore_eos": True},
    }
    request = urllib.request.Request(
        f"{url}/generate",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        rows = json.loads(answer.read())
    completion = sum(int(r["meta_info"]["completion_tokens"]) for r in rows)
    verify = sum(int(r["meta_info"].get("spec_verify_ct", 0)) for r in rows)
    if verify <= 0:
        raise AssertionError("meta_info.spec_verify_ct is 0/absent: is EAGLE3 decoding on?")
    length = completion / verify
    if length < 1.0:
        raise AssertionError(f"acceptance length {length:.2f} < 1")
    return length, f"acceptance length {length:.2f} ({completion} tokens / {verify} verify steps)"


def run(work: Path) -> list[Row]:
    """Every step in order against the 10-minute budget; returns the table's rows."""
    s = Session(work)
    model_dir = s.step("target built + saved", lambda: save_target(work / "target"))
    ref = s.step(
        "hf features (cuda bf16)", lambda: hf_features(work, model_dir), model_dir is not None
    )
    draft = s.step("trainer NCCL bf16 + export", lambda: train(s, model_dir), ref is not None)
    if draft is None:
        for name in ("SGLang servers", "sglang vs hf features", "EAGLE3 acceptance"):
            s.step(name, lambda: (None, ""), needs=False)
        return s.rows
    start = time.monotonic()
    try:
        with sglang_servers(s, model_dir, draft) as urls:
            s.rows.append(
                Row("SGLang servers (plain + EAGLE3)", "ok", "healthy", time.monotonic() - start)
            )
            s.step("sglang vs hf features", lambda: compare(model_dir, urls, ref))
            s.step("EAGLE3 acceptance", lambda: acceptance(urls[1], ref))
    except Exception as exc:
        traceback.print_exc()
        s.rows.append(
            Row("SGLang servers (plain + EAGLE3)", "FAIL", f"{exc}"[:160], time.monotonic() - start)
        )
        for name in ("sglang vs hf features", "EAGLE3 acceptance"):
            s.step(name, lambda: (None, ""), needs=False)
    return s.rows


def main(argv: list[str] | None = None) -> int:
    """Print ``NOT RUN: <reason>`` and return 0 without CUDA; else run and print the table."""
    reason = not_run_reason()
    if reason is not None:
        print(reason)
        return 0
    if importlib.util.find_spec("sglang") is None:
        print("FAIL: sglang is not installed (pip install 'dataflow-launch[sglang]')")
        return 1
    work = Path(tempfile.mkdtemp(prefix="dataflow-gpu-"))
    started = time.monotonic()
    try:
        rows = run(work)
    finally:
        keep = os.environ.get("DATAFLOW_GPU_KEEP")
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    total = time.monotonic() - started
    print(
        f"total {total:.0f} s of a {BUDGET_S:.0f} s budget"
        + (f"; kept {work}" if os.environ.get("DATAFLOW_GPU_KEEP") else "")
    )
    return 0 if all(r.result == "ok" for r in rows) and total <= BUDGET_S else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
