"""Train the built-in target: a small LLaMA that has learned the shipped prompt generator.

Run ``python -m dataflow.launch.builtin.train_target [DIR]`` (default: the package's assets
directory). It writes ``target.safetensors`` (bf16 weights), ``target.json`` (shape, sha256 of
the weights, training record) and ``eval_prompts.jsonl`` (held-out prompts for ``eval``).

Data: conversations from :func:`~dataflow.launch.builtin.corpus.generate_conversations` with
:data:`TRAIN_SEED` (disjoint seed from the demo prompts'); the held-out prompts are first user
turns generated with :data:`EVAL_SEED` whose text appears in neither the target's training
conversations nor the demo prompts. Training is seeded (weights init, batch order) and runs in
fp32 on one thread (measured: two threads on a loaded 2-core machine run 10x slower), so a rerun on the same machine and torch gives the same file; the sha256 in
``target.json`` is what the loader checks, not a cross-machine promise.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from dataflow.launch.builtin.corpus import generate_conversations
from dataflow.launch.builtin.make_assets import demo_records
from dataflow.launch.config.sections import TRAINED_BUILTIN_SHAPE as TRAINED_SHAPE

TRAIN_SEED = 7
EVAL_SEED = 11
TRAIN_CONVERSATIONS = 6000
EVAL_PROMPTS = 24
STEPS = 300
BATCH = 32
LR = 3e-3
MAX_TOKENS = 128
WEIGHTS_FILE = "target.safetensors"
META_FILE = "target.json"
EVAL_PROMPTS_FILE = "eval_prompts.jsonl"


def _messages(conversation: list[tuple[str, str]]) -> list[dict[str, str]]:
    out = []
    for user, assistant in conversation:
        out.append({"role": "user", "content": user})
        out.append({"role": "assistant", "content": assistant})
    return out


def held_out_prompts() -> list[dict[str, Any]]:
    """The eval prompt records ``{"id", "messages": [one user turn]}`` (see module docstring)."""
    seen = {
        turn[0] for conv in generate_conversations(TRAIN_CONVERSATIONS, TRAIN_SEED) for turn in conv
    }
    for record in demo_records():
        turns = record["conversations"]
        assert isinstance(turns, list)
        seen.update(t["value"] for t in turns)
    prompts: list[dict[str, Any]] = []
    for conv in generate_conversations(2000, EVAL_SEED):
        text = conv[0][0]
        if text in seen:
            continue
        seen.add(text)
        prompts.append(
            {"id": f"eval-{len(prompts):03d}", "messages": [{"role": "user", "content": text}]}
        )
        if len(prompts) == EVAL_PROMPTS:
            break
    return prompts


def _encoded(tokenizer: Any) -> list[list[int]]:
    rows = []
    for conv in generate_conversations(TRAIN_CONVERSATIONS, TRAIN_SEED):
        text = tokenizer.apply_chat_template(_messages(conv), tokenize=False)
        rows.append(tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_TOKENS])
    return rows


def train(steps: int = STEPS, log: Any = print) -> tuple[Any, dict[str, Any]]:
    """Train the target from scratch; return ``(model, record)`` (the model in fp32)."""
    from dataflow.launch.builtin.target import build_builtin_target
    from dataflow.launch.config import BuiltinTargetSection

    torch.manual_seed(0)
    torch.set_num_threads(1)
    # A plain N(0, 0.02) head (logit_std 0.02 * sqrt(H)): training starts near uniform.
    section = BuiltinTargetSection(**TRAINED_SHAPE, weights="random", logit_std=0.226)
    model, tokenizer = build_builtin_target(section, torch.float32)
    model.train()
    rows = _encoded(tokenizer)
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps)
    )
    started = time.monotonic()
    loss_value = float("nan")
    for step in range(steps):
        batch = rng.sample(rows, BATCH)
        width = max(len(r) for r in batch)
        ids = torch.zeros(BATCH, width, dtype=torch.int64)
        mask = torch.zeros(BATCH, width, dtype=torch.int64)
        for i, r in enumerate(batch):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:4d} loss {loss_value:.4f} ({time.monotonic() - started:.0f} s)")
    record = {
        "shape": TRAINED_SHAPE,
        "train_seed": TRAIN_SEED,
        "train_conversations": TRAIN_CONVERSATIONS,
        "steps": steps,
        "batch": BATCH,
        "lr": LR,
        "final_loss": round(loss_value, 4),
        "torch": torch.__version__,
    }
    return model.eval(), record


def write_trained(directory: Path, steps: int = STEPS) -> None:
    """Train and write the three files into ``directory``."""
    from safetensors.torch import save_file

    model, record = train(steps)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    path = directory / WEIGHTS_FILE
    save_file(tensors, str(path), metadata={"format": "pt"})
    record["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (directory / META_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    body = "".join(json.dumps(p, separators=(",", ":")) + "\n" for p in held_out_prompts())
    (directory / EVAL_PROMPTS_FILE).write_text(body, encoding="utf-8")


def main() -> None:
    """Entry point of ``python -m dataflow.launch.builtin.train_target``."""
    target = (
        Path(sys.argv[1]) if len(sys.argv) > 1 else Path(str(files("dataflow.launch"))) / "assets"
    )
    write_trained(target)
    print(f"wrote {WEIGHTS_FILE}, {META_FILE} and {EVAL_PROMPTS_FILE} to {target}")


if __name__ == "__main__":
    main()
