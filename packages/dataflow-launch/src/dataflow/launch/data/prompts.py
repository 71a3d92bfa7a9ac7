"""Loading a prompt set: JSONL → tokenised prompts with loss masks, malformed lines reported."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from dataflow.contracts.checks import is_int
from dataflow.launch.config import DataSection
from dataflow.launch.data.chat import encode_conversation, encode_prompt, normalise_conversation
from dataflow.launch.data.jsonl import BadLine, MalformedRecord, read_records


@dataclass(frozen=True)
class Prompt:
    """One tokenised prompt: where it came from, its token ids and its 0/1 loss mask."""

    line: int
    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]


@dataclass(frozen=True)
class PromptSet:
    """A loaded prompt file.

    ``prompts`` are in file order; ``malformed`` lists unusable lines (at most the configured
    limit, or loading would have failed); ``no_loss`` lists lines left with no assistant token
    after truncation (usable JSON, but nothing to train on); ``too_long`` lists lines whose
    prompt leaves less room than the response needs (regeneration only: such a prompt is
    skipped, never truncated).
    """

    source: str
    prompts: tuple[Prompt, ...]
    malformed: tuple[BadLine, ...]
    no_loss: tuple[int, ...]
    too_long: tuple[int, ...] = ()

    def report(self) -> str:
        """One line for logs: how many prompts were kept and why others were not."""
        text = f"{self.source}: {len(self.prompts)} prompts"
        if self.malformed:
            lines = ", ".join(str(b.line) for b in self.malformed[:10])
            text += f", {len(self.malformed)} malformed (lines {lines})"
        if self.no_loss:
            text += f", {len(self.no_loss)} without assistant tokens"
        if self.too_long:
            text += f", {len(self.too_long)} prompts too long to leave room for the response"
        return text


def demo_prompts_path() -> Path:
    """The shipped demo prompt file (ShareGPT format)."""
    return Path(str(files("dataflow.launch").joinpath("assets", "prompts.jsonl")))


def _token_list(record: dict[str, Any], key: str, vocab_size: int | None) -> list[int]:
    values = record.get(key)
    if not isinstance(values, list) or not values:
        raise MalformedRecord(f"'{key}' must be a non-empty list of ints")
    for i, v in enumerate(values):
        if not is_int(v) or v < 0:
            raise MalformedRecord(f"{key}[{i}] = {v!r} is not a non-negative int")
        if vocab_size is not None and key == "input_ids" and v >= vocab_size:
            raise MalformedRecord(f"input_ids[{i}] = {v} is outside the vocabulary ({vocab_size})")
    return list(values)


def _token_ids_parser(
    max_length: int, vocab_size: int | None
) -> Callable[[Any], tuple[list[int], list[int]]]:
    def parse(record: Any) -> tuple[list[int], list[int]]:
        if not isinstance(record, dict):
            raise MalformedRecord(f"expected a JSON object, got {type(record).__name__}")
        ids = _token_list(record, "input_ids", vocab_size)
        if "loss_mask" in record:
            mask = _token_list(record, "loss_mask", None)
            if len(mask) != len(ids) or any(m not in (0, 1) for m in mask):
                raise MalformedRecord("loss_mask must be 0/1 values, one per input id")
        else:
            mask = [1] * len(ids)
        return ids[:max_length], mask[:max_length]

    return parse


def _sharegpt_parser(
    tokenizer: Any, max_length: int
) -> Callable[[Any], tuple[list[int], list[int]]]:
    def parse(record: Any) -> tuple[list[int], list[int]]:
        return encode_conversation(tokenizer, normalise_conversation(record), max_length)

    return parse


def _prompt_parser(
    data_format: str, tokenizer: Any, vocab_size: int | None
) -> Callable[[Any], tuple[list[int], list[int]]]:
    """Prompt-only records for regeneration (see :mod:`dataflow.launch.data.chat`): a
    conversation's turns before its first assistant turn; a ``token_ids`` record's ids before
    the first loss-mask 1 (the data's own response is dropped). Never truncated.
    """
    if data_format == "sharegpt":

        def parse_chat(record: Any) -> tuple[list[int], list[int]]:
            return encode_prompt(tokenizer, normalise_conversation(record, need_assistant=False))

        return parse_chat
    full = _token_ids_parser(2**62, vocab_size)

    def parse_ids(record: Any) -> tuple[list[int], list[int]]:
        ids, mask = full(record)
        if "loss_mask" not in record:
            raise MalformedRecord(
                "producer.regenerate needs a loss_mask whose leading 0s mark the prompt"
            )
        cut = mask.index(1) if 1 in mask else len(mask)
        if cut == 0:
            raise MalformedRecord("producer.regenerate: loss_mask starts with 1, so no prompt")
        return ids[:cut], [0] * cut

    return parse_ids


def load_prompts(
    data: DataSection, tokenizer: Any, *, regenerate_tokens: int | None = None
) -> PromptSet:
    """Load ``data.path`` (or the shipped demo prompts) in ``data.format``.

    ShareGPT records are rendered with ``tokenizer``'s chat template; ``token_ids`` records are
    checked against its vocabulary. Raises :class:`InvalidInputError` naming the lines when
    more than ``data.max_malformed_lines`` are malformed; reads nothing else on failure.

    ``regenerate_tokens`` (``producer.max_new_tokens`` when ``producer.regenerate`` is on) loads
    prompts only, loss mask all 0, each at most ``data.max_length - regenerate_tokens`` tokens
    so prompt + response fit ``data.max_length``; longer ones are skipped (``too_long``).
    """
    path = Path(data.path) if data.path is not None else demo_prompts_path()
    vocab = len(tokenizer) if tokenizer is not None else None
    if regenerate_tokens is not None:
        parser = _prompt_parser(data.format, tokenizer, vocab)
    elif data.format == "sharegpt":
        parser = _sharegpt_parser(tokenizer, data.max_length)
    else:
        parser = _token_ids_parser(data.max_length, vocab)
    records, bad = read_records(path, parser, data.max_malformed_lines)
    prompts, no_loss, too_long = [], [], []
    for line, (ids, mask) in records:
        if regenerate_tokens is not None:
            if len(ids) + regenerate_tokens > data.max_length:
                too_long.append(line)
                continue
        elif not any(mask):
            no_loss.append(line)
            continue
        prompts.append(Prompt(line, tuple(ids), tuple(mask)))
        if data.max_prompts is not None and len(prompts) >= data.max_prompts:
            break
    return PromptSet(str(path), tuple(prompts), tuple(bad), tuple(no_loss), tuple(too_long))
