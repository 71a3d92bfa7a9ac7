"""The in-process EAGLE3 evaluator: a chain drafter and a greedy verifier over a transformers target.

Per round, with ``tokens`` the sequence so far and ``aux`` the target's captured layers at every
position but the last (layer id ``k`` = output of decoder layer ``k`` = HF ``hidden_states[k + 1]``):

1. **Draft** ``k`` tokens with the trainer's own draft modules (``fc``, ``midlayer``, ``norm``,
   ``lm_head``, the TTT cache): step 0 runs over every position (position ``t`` sees
   ``fc(aux[t])`` and the embedding of token ``t + 1``); step ``j`` feeds the embedding of the
   previous guess at the last position. This is the attention pattern the draft was trained
   with, and the one vLLM's EAGLE3 proposer builds with its KV cache.
2. **Verify**: one target forward over ``tokens + guesses``; the longest prefix of guesses equal
   to the target's argmax is accepted, plus the target's own next token (so every round emits
   ``accepted + 1`` tokens, all of them the target's greedy choice).

Counting matches vLLM's counters: one *draft* per round, ``accepted`` = accepted guesses,
``accepted_per_position[i]`` = rounds whose guess ``i`` was accepted. The target runs without a
KV cache (full forward per round) in both the speculative and the target-only loops, so the
tokens/s ratio measures target forwards saved, not cache engineering.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dataflow.train.eagle3 import Eagle3DraftModel, LocalSequence, draft_to_target_ids
from dataflow.train.eagle3.layers import TTTCache


@dataclass
class SpecCounts:
    """Counters of one evaluation, summed over prompts."""

    drafts: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    generated: int = 0
    seconds: float = 0.0


class HFSpecDecoder:
    """Greedy EAGLE3 speculative decoding of a transformers causal LM with an exported draft.

    Guarantees: every emitted token is the target's argmax given the tokens before it (the
    output equals target-only greedy decoding up to numerical ties); counters follow vLLM's
    definitions (module docstring). Runs under ``torch.no_grad`` on CPU.
    """

    def __init__(self, target: Any, draft: Eagle3DraftModel, eos_token_id: int | None) -> None:
        self._target = target.eval()
        self._draft = draft.eval()
        self._embed = target.get_input_embeddings()
        self._layers = [k + 1 for k in draft.config.target_layers]
        self._draft_ids = draft_to_target_ids(draft.d2t)
        self._eos = eos_token_id

    def _forward(self, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._target(
            input_ids=torch.tensor([tokens]), output_hidden_states=True, use_cache=False
        )
        aux = torch.cat([out.hidden_states[i] for i in self._layers], dim=-1)
        return out.logits[0].float().argmax(-1), aux

    def _chain(self, aux: torch.Tensor, tokens: list[int], k: int) -> list[int]:
        draft, dtype = self._draft, self._draft.fc.weight.dtype
        length = aux.shape[1]  # positions 0 .. len(tokens) - 2
        ids = torch.tensor([tokens[1:] + [0] * k])  # token t + 1 + j at row t, pad past the end
        hidden = draft.fc(aux.to(dtype))
        cache = TTTCache(torch.ones(1, length, dtype=torch.int64))
        guesses: list[int] = []
        for step in range(k):
            step_ids = ids[:, step : step + length].clone()
            if step:
                step_ids[0, -1] = guesses[-1]
            embeds = self._embed(step_ids).to(dtype)
            hidden = draft.midlayer(embeds, hidden, step, cache, LocalSequence())
            logits = draft.lm_head(draft.norm(hidden[:, -1:]))
            guesses.append(int(self._draft_ids[logits[0, -1].float().argmax()]))
        return guesses

    @torch.no_grad()
    def generate(
        self, prompt: list[int], max_new_tokens: int, k: int, counts: SpecCounts
    ) -> list[int]:
        """Speculatively decode ``prompt`` greedily; return the new tokens; add to ``counts``."""
        if len(counts.accepted_per_position) < k:
            counts.accepted_per_position.extend([0] * (k - len(counts.accepted_per_position)))
        started = time.perf_counter()
        tokens = list(prompt)
        preds, aux = self._forward(tokens)
        tokens.append(int(preds[-1]))
        while len(tokens) - len(prompt) < max_new_tokens and tokens[-1] != self._eos:
            guesses = self._chain(aux[:, : len(tokens) - 1], tokens, k)
            preds, aux = self._forward(tokens + guesses)
            verified = preds[len(tokens) - 1 :].tolist()
            accepted = 0
            while accepted < k and guesses[accepted] == verified[accepted]:
                accepted += 1
            counts.drafts += 1
            counts.accepted += accepted
            for i in range(accepted):
                counts.accepted_per_position[i] += 1
            tokens.extend(verified[: accepted + 1])
            if self._eos is not None and self._eos in tokens[len(prompt) :]:
                break
        new = _until_eos(tokens[len(prompt) :][:max_new_tokens], self._eos)
        counts.generated += len(new)
        counts.seconds += time.perf_counter() - started
        return new

    @torch.no_grad()
    def generate_target_only(
        self, prompt: list[int], max_new_tokens: int, counts: SpecCounts
    ) -> list[int]:
        """Plain greedy decoding of the target (same forward as :meth:`generate`)."""
        started = time.perf_counter()
        tokens = list(prompt)
        while len(tokens) - len(prompt) < max_new_tokens:
            out = self._target(input_ids=torch.tensor([tokens]), use_cache=False)
            tokens.append(int(out.logits[0, -1].float().argmax()))
            if tokens[-1] == self._eos:
                break
        new = tokens[len(prompt) :]
        counts.generated += len(new)
        counts.seconds += time.perf_counter() - started
        return new


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in tokens:
        return tokens[: tokens.index(eos) + 1]
    return tokens
