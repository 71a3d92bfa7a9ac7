"""What stock SGLang's ``/generate`` answers with ``return_hidden_states``, read from its sources.

Sources (sgl-project/sglang; commits as stored in the public index):

- ``python/sglang/srt/managers/tokenizer_manager.py`` (``_validate_one_request``): a request
  with ``return_hidden_states`` on a server started without ``--enable-return-hidden-states``
  raises ``ValueError("The server is not configured to return the hidden states. Please set
  `--enable-return-hidden-states` to enable this feature.")``;
  ``python/sglang/srt/entrypoints/http_server.py`` (``_create_error_response``) answers it as
  HTTP 400 ``{"error": {"message": str(e)}}``.
- ``python/sglang/srt/layers/logits_processor.py`` (commit 009db01a, ``LogitsProcessor.forward``,
  ``capture_hidden_mode.is_full()``): the stored rows are the model's ``hidden_states`` — for
  LLaMA the output of the final ``RMSNorm`` (``models/llama.py`` ``LlamaModel.forward``:
  ``hidden_states, _ = self.norm(hidden_states, residual)``) — unless the model captures aux
  layers, in which case they are ``torch.cat(aux_hidden_states, dim=-1)`` INSTEAD (one row of
  ``len(ids) * H``), and the post-norm state is not returned at all.
- Aux layers are captured only when the server runs ``--speculative-algorithm EAGLE3``:
  ``model_executor/model_runner.py`` reads ``eagle_config["eagle_aux_hidden_state_layer_ids"]``
  from the DRAFT model's config and calls ``set_eagle3_layers_to_capture(ids)``, which sets
  ``layers_to_capture = [i + 1 for i in ids]`` (default ``[2, N//2, N-3]``); ``LlamaModel.forward``
  appends ``hidden_states + residual`` BEFORE running layer ``i``: so id ``k`` is the residual
  stream after decoder layer ``k`` (HF ``hidden_states[k + 1]``, before the final norm), the same
  convention as this project's ``aux_layer_ids``.
- ``managers/scheduler_components/batch_result_processor.py`` (commit 003ddbce,
  ``_append_prefill_hidden_states``): in FULL mode a prefill appends
  ``hidden_states[offset : offset + extend_input_len].cpu().clone().tolist()`` — one block of
  JSON floats, one row per token the forward COMPUTED — to ``req.hidden_states``; decode steps
  append one row each after it. A middle chunk of a chunked prefill is not stored
  (``store=should_commit_output``), and radix-cache hits are not computed, so a capture server
  needs ``--chunked-prefill-size -1`` (or one larger than any prompt) and
  ``--disable-radix-cache``; otherwise the block is shorter than the prompt.
- ``tokenizer_manager.py``: ``meta_info["hidden_states"] = recv_obj.output_hidden_states[i]``;
  a batched request (``input_ids`` a list of lists) answers a JSON list of rows in order.

Hence stock SGLang can never return the three aux layers AND the post-norm last hidden state in
one response: the engine asks two stock servers (see :mod:`dataflow.launch.engines.sglang`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dataflow.contracts import SchemaMismatchError

NOT_ENABLED = "The server is not configured to return the hidden states."
"""The start of stock SGLang's refusal when ``--enable-return-hidden-states`` is missing."""


def generate_body(prompts: Sequence[Sequence[int]]) -> dict[str, Any]:
    """The ``/generate`` body: batched token ids, hidden states, one greedy token (prefill)."""
    return {
        "input_ids": [list(ids) for ids in prompts],
        "return_hidden_states": True,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 1},
    }


def error_message(body: Any) -> str:
    """The message of SGLang's ``{"error": {"message": ...}}`` error body ('' if none)."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))
    return ""


def prefill_block(row: Any, *, where: str, num_tokens: int, width: int, what: str) -> torch.Tensor:
    """``meta_info.hidden_states[0]`` of one response row as a float32 ``[T, width]`` tensor.

    Raises :class:`SchemaMismatchError` naming ``where`` when the row has no hidden states, or the
    block is not ``num_tokens`` rows of ``width`` floats (fewer rows: the server reused a cached
    prefix or chunked the prefill; the message names the flags that prevent it).
    """
    meta = row.get("meta_info") if isinstance(row, dict) else None
    blocks = meta.get("hidden_states") if isinstance(meta, dict) else None
    if not isinstance(blocks, list) or not blocks:
        raise SchemaMismatchError(
            f"{where}: the response row has no meta_info.hidden_states (is the server started "
            "with --enable-return-hidden-states?)"
        )
    try:
        block = torch.tensor(blocks[0], dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise SchemaMismatchError(
            f"{where}: meta_info.hidden_states[0] is not a matrix of floats ({exc})"
        ) from None
    if block.dim() != 2:
        raise SchemaMismatchError(
            f"{where}: meta_info.hidden_states[0] has shape {list(block.shape)}, expected "
            f"[{num_tokens}, {width}] ({what})"
        )
    if block.shape[0] != num_tokens:
        raise SchemaMismatchError(
            f"{where}: the prefill block has {block.shape[0]} rows for a {num_tokens}-token "
            "prompt; start the server with --disable-radix-cache and --chunked-prefill-size -1 "
            "so every prompt token is computed in one pass"
        )
    if block.shape[1] != width:
        raise SchemaMismatchError(
            f"{where}: the prefill block is {block.shape[1]} wide, expected {width} ({what})"
        )
    return block
