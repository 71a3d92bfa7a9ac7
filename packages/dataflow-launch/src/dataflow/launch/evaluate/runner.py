"""``eval``: greedy speculative decoding of held-out prompts with an exported draft.

Both engines report the same :class:`EvalResult`: mean acceptance length
``1 + accepted / drafts``, acceptance per draft position (``accepted_at_i / drafts``), tokens/s
with and without the draft, and whether the speculative output equals target-only greedy
decoding token for token (lossless).

* ``hf`` (:mod:`.hf_spec`): the target under transformers, the draft run by the trainer's own
  modules, in this process.
* ``vllm`` (:mod:`.vllm_spec`): vLLM's ``eagle3`` method loading the export as written; the
  figures are vLLM's own ``spec_decode`` counters.

The two agree on the same prompts and ``k`` up to numerical ties: a draft or target argmax whose
top two logits differ by less than the engines' numeric differences (fused kernels, bf16
accumulation orders) can flip one acceptance and shift the rest of that prompt's generation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from dataflow.contracts import InvalidInputError, NotFoundError

EVAL_PROMPTS_ASSET = "eval_prompts.jsonl"
DEFAULT_MAX_NEW_TOKENS = 48
AGREEMENT_TOLERANCE = 0.15
"""Largest difference of mean acceptance length between the hf and vllm engines on the same
prompts and k that counts as agreement (see the module docstring: ties)."""


@dataclass(frozen=True)
class EvalResult:
    """What one ``eval`` measured (JSON-compatible)."""

    engine: str
    num_speculative_tokens: int
    prompts: int
    drafts: int
    accepted: int
    mean_acceptance_length: float
    acceptance_per_position: list[float]
    tokens_per_s_spec: float
    tokens_per_s_target: float
    speedup: float
    generated_tokens: int
    lossless: bool
    mismatched_prompts: list[int]
    draft: str
    target: str

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON object."""
        return asdict(self)


def default_prompts_path() -> Path:
    """The shipped held-out prompts (``assets/eval_prompts.jsonl``)."""
    return Path(str(files("dataflow.launch").joinpath("assets", EVAL_PROMPTS_ASSET)))


def load_eval_prompts(
    path: Path | None, tokenizer: Any, limit: int | None = None
) -> list[list[int]]:
    """Token ids of each prompt of ``path`` (JSONL ShareGPT / messages records; a record's
    trailing assistant turns are dropped), rendered with the chat template and the generation
    prompt. Raises :class:`NotFoundError` / :class:`InvalidInputError` naming the file or line.
    """
    source = path or default_prompts_path()
    if not source.is_file():
        raise NotFoundError(f"--prompts {str(source)!r} does not exist")
    prompts = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            messages = _messages(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidInputError(f"{source}:{number}: not a prompt record ({exc!r})") from None
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            raise InvalidInputError(f"{source}:{number}: the record has no user turn")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        if limit is not None and len(prompts) == limit:
            break
    if not prompts:
        raise InvalidInputError(f"--prompts {str(source)!r} holds no prompt")
    return prompts


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_ROLES["system"] = "system"


def _messages(record: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in record:
        return [{"role": m["role"], "content": str(m["content"])} for m in record["messages"]]
    return [
        {"role": _ROLES[t["from"]], "content": str(t["value"])} for t in record["conversations"]
    ]


def make_result(
    engine: str,
    k: int,
    prompts: int,
    drafts: int,
    accepted: int,
    per_position: list[int],
    spec: tuple[int, float],
    target: tuple[int, float],
    mismatched: list[int],
    paths: tuple[str, str],
) -> EvalResult:
    """An :class:`EvalResult` from raw counts (``spec``/``target``: tokens, seconds)."""
    spec_tps = spec[0] / spec[1] if spec[1] > 0 else 0.0
    target_tps = target[0] / target[1] if target[1] > 0 else 0.0
    return EvalResult(
        engine=engine,
        num_speculative_tokens=k,
        prompts=prompts,
        drafts=drafts,
        accepted=accepted,
        mean_acceptance_length=1.0 + accepted / drafts if drafts else 1.0,
        acceptance_per_position=[a / drafts if drafts else 0.0 for a in per_position[:k]],
        tokens_per_s_spec=round(spec_tps, 2),
        tokens_per_s_target=round(target_tps, 2),
        speedup=round(spec_tps / target_tps, 3) if target_tps else 0.0,
        generated_tokens=spec[0],
        lossless=not mismatched,
        mismatched_prompts=mismatched,
        draft=paths[0],
        target=paths[1],
    )


def render_result(result: EvalResult) -> str:
    """A few lines of text for the terminal."""
    per = " / ".join(f"{a:.2f}" for a in result.acceptance_per_position)
    return "\n".join(
        [
            f"== eval ({result.engine}, k={result.num_speculative_tokens}, "
            f"{result.prompts} prompts) ==",
            f"mean acceptance length  {result.mean_acceptance_length:.3f}  "
            f"({result.accepted} accepted / {result.drafts} drafts)",
            f"acceptance per position {per}",
            f"tokens/s                {result.tokens_per_s_spec:.1f} with the draft, "
            f"{result.tokens_per_s_target:.1f} target only (x{result.speedup:.2f})",
            f"lossless                {result.lossless}"
            + (f" (prompts {result.mismatched_prompts} differ)" if not result.lossless else ""),
            f"draft                   {result.draft}",
            f"target                  {result.target}",
        ]
    )


def plot_acceptance(results: dict[str, EvalResult], out: Path) -> Path | None:
    """A bar chart of acceptance per draft position, one series per labelled result; None
    without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(results))
    for i, (label, result) in enumerate(results.items()):
        xs = [
            p + 1 + (i - (len(results) - 1) / 2) * width
            for p in range(len(result.acceptance_per_position))
        ]
        ax.bar(
            xs,
            result.acceptance_per_position,
            width=width,
            label=f"{label}: mean length {result.mean_acceptance_length:.2f}",
        )
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance (accepted / drafts)")
    ax.set_ylim(0, 1)
    ax.set_title("speculative decoding: acceptance per draft position")
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
