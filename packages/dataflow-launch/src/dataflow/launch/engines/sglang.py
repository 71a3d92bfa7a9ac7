"""The ``sglang`` engine: a client for a running SGLang server's hidden-state capture.

GPU machines only (the server needs CUDA); this client itself needs only ``requests``
(``pip install 'dataflow-launch[sglang]'``). The wire contract it speaks:

- ``GET {url}/health`` answers 200 when the server is up.
- ``POST {url}/generate`` with ``{"input_ids": [[ids…], …], "return_hidden_states": true,
  "sampling_params": {"temperature": 0, "max_new_tokens": 1}}`` answers one row per prompt, in
  order. Each row's ``meta_info.hidden_states[0]`` is the prefill block: a ``T * 4H`` matrix
  whose first ``3H`` columns are the three captured layers (in ``aux_layer_ids`` order) and
  whose last ``H`` columns are the last post-norm hidden state. ``meta_info.aux_layer_ids``, when
  present, must equal the ids this client expects. The server is launched with hidden-state
  return enabled and EAGLE3 aux-layer capture of those layers.

Any disagreement (row count, T, width, layer ids) is a :class:`SchemaMismatchError`; a server
that cannot be reached or answers an HTTP error is a :class:`BackendUnavailableError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dataflow.contracts import (
    BackendUnavailableError,
    FeatureSpec,
    InvalidInputError,
    PromptTask,
    SchemaMismatchError,
)
from dataflow.launch.config import TargetSection
from dataflow.launch.engines.base import CapturedSample, TargetHead, TargetInfo
from dataflow.launch.engines.features import checked_sample, eagle3_feature_specs
from dataflow.launch.engines.layers import resolve_aux_layer_ids
from dataflow.launch.engines.payload import encode_payload
from dataflow.launch.engines.target_files import read_head_weights, read_model_config
from dataflow.launch.extras import require

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_request(encoded: Sequence[tuple[list[int], list[int]]]) -> dict[str, Any]:
    """The ``/generate`` body for a batch of tokenised prompts (prefill only, greedy)."""
    return {
        "input_ids": [list(ids) for ids, _ in encoded],
        "return_hidden_states": True,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 1},
    }


def parse_row(
    row: Any, task_id: str, num_tokens: int, info: TargetInfo
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden_state [1,T,H], aux_hidden_state [1,T,3H])`` from one response row."""
    meta: dict[str, Any] = {}
    if isinstance(row, dict) and isinstance(row.get("meta_info"), dict):
        meta = row["meta_info"]
    blocks = meta.get("hidden_states")
    if not isinstance(blocks, list) or not blocks:
        raise SchemaMismatchError(
            f"task {task_id!r}: the response has no meta_info.hidden_states; is the server "
            "launched with hidden-state return enabled?"
        )
    ids = meta.get("aux_layer_ids")
    if ids is not None and tuple(ids) != info.aux_layer_ids:
        raise SchemaMismatchError(
            f"task {task_id!r}: the server captured layers {list(ids)}, expected "
            f"{list(info.aux_layer_ids)}"
        )
    try:
        block = torch.tensor(blocks[0], dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise SchemaMismatchError(
            f"task {task_id!r}: hidden_states[0] is not a matrix ({exc})"
        ) from None
    h = info.hidden_size
    if block.dim() != 2 or block.shape[0] != num_tokens or block.shape[1] != 4 * h:
        raise SchemaMismatchError(
            f"task {task_id!r}: hidden_states[0] has shape {list(block.shape)}, expected "
            f"[{num_tokens}, {4 * h}] (3 aux layers + last hidden, H={h})"
        )
    dtype = _DTYPES[info.dtype]
    aux = block[:, : 3 * h].to(dtype).unsqueeze(0).contiguous()
    last = block[:, 3 * h :].to(dtype).unsqueeze(0).contiguous()
    return last, aux


class SGLangTargetEngine:
    """Captures features from a running SGLang server; implements :class:`TargetEngine`.

    Guarantees: the server is probed at construction (unreachable → error naming the URL, after
    at most ``timeout_s``); one checked sample per task, in task order; the embedding and LM
    head come from the same local model directory the server loaded.
    """

    def __init__(
        self,
        server_url: str,
        model_dir: str,
        *,
        dtype: str = "bfloat16",
        aux_layer_ids: Sequence[int] | None = None,
        batch_size: int = 8,
        timeout_s: float = 300.0,
        version: str | None = None,
        tokenizer: Any | None = None,
    ) -> None:
        self._requests: Any = require("requests")
        self._url = server_url.rstrip("/")
        self._model_dir = model_dir
        self._timeout = timeout_s
        self._batch_size = batch_size
        config = read_model_config(model_dir)
        num_layers = int(config["num_hidden_layers"])
        self._info = TargetInfo(
            hidden_size=int(config["hidden_size"]),
            vocab_size=int(config["vocab_size"]),
            num_layers=num_layers,
            aux_layer_ids=resolve_aux_layer_ids(num_layers, aux_layer_ids),
            dtype=dtype,
            version=version or model_dir.rstrip("/").rsplit("/", 1)[-1],
            pad_token_id=int(config.get("pad_token_id") or 0),
        )
        self._tokenizer = tokenizer
        self._probe()

    def _probe(self) -> None:
        try:
            answer = self._requests.get(f"{self._url}/health", timeout=min(self._timeout, 10.0))
        except self._requests.RequestException as exc:
            raise BackendUnavailableError(
                f"SGLang server {self._url} is unreachable: {type(exc).__name__}"
            ) from None
        if answer.status_code != 200:
            raise BackendUnavailableError(
                f"SGLang server {self._url} is not healthy: /health answered {answer.status_code}"
            )

    @property
    def info(self) -> TargetInfo:
        return self._info

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of the model directory (loaded on first use)."""
        if self._tokenizer is None:
            transformers = require("transformers")
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(
                self._model_dir, local_files_only=True
            )
        return self._tokenizer

    def feature_specs(self, num_tokens: int) -> dict[str, FeatureSpec]:
        return eagle3_feature_specs(self._info, num_tokens)

    def target_head(self) -> TargetHead:
        embed, head = read_head_weights(self._model_dir)
        return TargetHead(
            self._info,
            embed.detach().clone(),
            head.detach().clone(),
            model_config=read_model_config(self._model_dir),
        )

    def capture(self, tasks: Sequence[PromptTask]) -> list[CapturedSample]:
        needs_tokenizer = any("messages" in t.payload for t in tasks)
        tokenizer = self.tokenizer if needs_tokenizer else None
        encoded = [encode_payload(t, tokenizer, self._info.vocab_size) for t in tasks]
        samples: list[CapturedSample] = []
        for start in range(0, len(tasks), self._batch_size):
            stop = min(start + self._batch_size, len(tasks))
            samples.extend(self._capture_batch(tasks[start:stop], encoded[start:stop]))
        return samples

    def _post(self, body: dict[str, Any]) -> Any:
        try:
            answer = self._requests.post(f"{self._url}/generate", json=body, timeout=self._timeout)
        except self._requests.RequestException as exc:
            raise BackendUnavailableError(
                f"SGLang server {self._url} failed the request: {type(exc).__name__}"
            ) from None
        if answer.status_code != 200:
            raise BackendUnavailableError(
                f"SGLang server {self._url} answered HTTP {answer.status_code}: {answer.text[:200]}"
            )
        try:
            return answer.json()
        except ValueError:
            raise SchemaMismatchError(f"SGLang server {self._url} answered non-JSON") from None

    def _capture_batch(
        self, tasks: Sequence[PromptTask], encoded: list[tuple[list[int], list[int]]]
    ) -> list[CapturedSample]:
        rows = self._post(build_request(encoded))
        if isinstance(rows, dict):
            rows = [rows]
        if not isinstance(rows, list) or len(rows) != len(tasks):
            got = len(rows) if isinstance(rows, list) else type(rows).__name__
            raise SchemaMismatchError(
                f"SGLang server {self._url} answered {got} rows for {len(tasks)} prompts"
            )
        samples = []
        for task, (ids, mask), row in zip(tasks, encoded, rows, strict=True):
            last, aux = parse_row(row, task.task_id, len(ids), self._info)
            tensors = {
                "input_ids": torch.tensor([ids], dtype=torch.int64),
                "loss_mask": torch.tensor([mask], dtype=torch.int64),
                "hidden_state": last,
                "aux_hidden_state": aux,
            }
            samples.append(checked_sample(task.task_id, tensors, self._info))
        return samples

    def close(self) -> None:
        pass


def open_sglang_engine(target: TargetSection) -> SGLangTargetEngine:
    """The ``sglang`` engine for ``target`` (the config guarantees server_url and model_dir)."""
    if target.server_url is None or target.model_dir is None:
        raise InvalidInputError("the sglang engine needs target.server_url and target.model_dir")
    return SGLangTargetEngine(
        target.server_url,
        target.model_dir,
        dtype=target.dtype,
        aux_layer_ids=target.aux_layer_ids,
        batch_size=target.batch_size,
        timeout_s=target.request_timeout_s,
        version=target.version,
    )
