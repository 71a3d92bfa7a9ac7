"""Regenerate the shipped demo assets: ``prompts.jsonl`` and ``tokenizer.json``.

Run ``python -m dataflow.launch.builtin.make_assets [DIR]`` (default: the package's assets
directory). The output is a pure function of the seeds below; a test checks that the committed
files equal a fresh regeneration.
"""

from __future__ import annotations

import json
import sys
from importlib.resources import files
from pathlib import Path

from dataflow.launch.builtin.corpus import generate_conversations, to_sharegpt
from dataflow.launch.builtin.tokenizer import TOKENIZER_FILE, train_tokenizer

PROMPTS_FILE = "prompts.jsonl"
DEMO_CONVERSATIONS = 400
DEMO_SEED = 20260
_TRAIN_ROLES = ("user", "assistant")


def demo_records() -> list[dict[str, object]]:
    """The demo prompt set as ShareGPT records."""
    convs = generate_conversations(DEMO_CONVERSATIONS, DEMO_SEED)
    return [to_sharegpt(c, i) for i, c in enumerate(convs)]


def prompts_text(records: list[dict[str, object]]) -> str:
    """The JSONL file body for ``records`` (one compact JSON object per line)."""
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)


def tokenizer_text(records: list[dict[str, object]]) -> str:
    """``tokenizer.json`` trained on the records' text (role markers included)."""
    texts = []
    for record in records:
        turns = record["conversations"]
        assert isinstance(turns, list)
        for i, turn in enumerate(turns):
            texts.append(f"{_TRAIN_ROLES[i % 2]}\n{turn['value']}\n")
    tokenizer = train_tokenizer(texts)
    return str(tokenizer.to_str(pretty=False))


def write_assets(directory: Path) -> None:
    """Write both assets into ``directory``."""
    records = demo_records()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / PROMPTS_FILE).write_text(prompts_text(records), encoding="utf-8")
    (directory / TOKENIZER_FILE).write_text(tokenizer_text(records), encoding="utf-8")


def main() -> None:
    """Entry point of ``python -m dataflow.launch.builtin.make_assets``."""
    target = (
        Path(sys.argv[1]) if len(sys.argv) > 1 else Path(str(files("dataflow.launch"))) / "assets"
    )
    write_assets(target)
    print(f"wrote {PROMPTS_FILE} and {TOKENIZER_FILE} to {target}")


if __name__ == "__main__":
    main()
