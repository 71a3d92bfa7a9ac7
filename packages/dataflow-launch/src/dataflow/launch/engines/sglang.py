"""The ``sglang`` engine: features from two stock SGLang servers over ``/generate``.

Stock SGLang returns, per prompt, ONE prefill block of hidden states (see
:mod:`dataflow.launch.engines.sglang_wire` for the source lines): the post-final-norm last hidden
state on a plain server, or — on a server running ``--speculative-algorithm EAGLE3`` — the
concatenated aux layers named by the draft config's ``eagle_config.eagle_aux_hidden_state_layer_ids``
instead. It can never return both, so this engine asks two servers over the same weights:

- ``server_url`` (plain): ``--enable-return-hidden-states --disable-radix-cache
  --chunked-prefill-size -1`` → ``hidden_state`` ``[T, H]``;
- ``aux_server_url`` (EAGLE3 with a draft whose ``eagle_aux_hidden_state_layer_ids`` equal
  ``target.aux_layer_ids``; SGLang's ids are the output of decoder layer k, as ours) plus the
  same three flags → ``aux_hidden_state`` ``[T, 3H]``.

Both answer JSON floats (``.tolist()`` of the model-dtype tensor), so values are exact in the
model dtype and cast back to it. The mode that writes all features in one pass without JSON is
SpecForge's patched server (``--enable-spec-capture``, tensors written into Mooncake), not stock
SGLang. ``capture="mooncake"`` (config ``target.capture: mooncake``) speaks that protocol
(:mod:`dataflow.launch.engines.sglang_capture`): one patched server at ``server_url`` writes all
four features into the run's ``mooncake://`` store and each sample comes back as
:class:`~dataflow.launch.engines.base.ServerWritten` (shapes and dtypes checked against
:meth:`SGLangTargetEngine.feature_specs`), which the producer commits without a put.

Errors: an SGLang refusal (HTTP 400 ``{"error": {"message"}}``, e.g. the missing
``--enable-return-hidden-states``) is an ``InvalidInputError`` quoting it; any shape disagreement
(rows, T, width) a :class:`SchemaMismatchError`; an unreachable server or another HTTP error a
:class:`BackendUnavailableError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dataflow.contracts import (
    BackendUnavailableError,
    InvalidInputError,
    PromptTask,
    SchemaMismatchError,
)
from dataflow.launch.config import TargetSection
from dataflow.launch.engines import sglang_capture as spec_capture
from dataflow.launch.engines.base import CapturedSample
from dataflow.launch.engines.features import checked_sample
from dataflow.launch.engines.payload import encode_payload
from dataflow.launch.engines.served import ServedModelDirEngine, served_target_info
from dataflow.launch.engines.sglang_wire import error_message, generate_body, prefill_block
from dataflow.launch.extras import require

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_request(encoded: Sequence[tuple[list[int], list[int]]]) -> dict[str, Any]:
    """The ``/generate`` body for a batch of tokenised prompts (prefill only, greedy)."""
    return generate_body([ids for ids, _ in encoded])


class SGLangTargetEngine(ServedModelDirEngine):
    """Captures features from a running SGLang server; implements :class:`TargetEngine`.

    Guarantees: the server is probed at construction (unreachable → error naming the URL, after
    at most ``timeout_s``); one checked sample per task, in task order; the embedding and LM
    head come from the same local model directory the server loaded.
    """

    def __init__(
        self,
        server_url: str,
        aux_server_url: str | None,
        model_dir: str,
        *,
        capture: str = "response",
        dtype: str = "bfloat16",
        aux_layer_ids: Sequence[int] | None = None,
        batch_size: int = 8,
        timeout_s: float = 300.0,
        version: str | None = None,
        tokenizer: Any | None = None,
    ) -> None:
        self._requests: Any = require("requests")
        if capture not in ("response", "mooncake"):
            raise InvalidInputError(f"capture must be 'response' or 'mooncake', got {capture!r}")
        if capture == "response" and aux_server_url is None:
            raise InvalidInputError("capture 'response' needs aux_server_url (the EAGLE3 server)")
        self._capture = capture
        self._generations = spec_capture.Generations()
        self._url = server_url.rstrip("/")
        self._aux_url = aux_server_url.rstrip("/") if aux_server_url else ""
        self._model_dir = model_dir
        self._timeout = timeout_s
        self._batch_size = batch_size
        self._info, _ = served_target_info(model_dir, aux_layer_ids, dtype, version)
        self._tokenizer = tokenizer
        self._probe(self._url)
        if capture == "response":
            self._probe(self._aux_url)

    def _probe(self, url: str) -> None:
        try:
            answer = self._requests.get(f"{url}/health", timeout=min(self._timeout, 10.0))
        except self._requests.RequestException as exc:
            raise BackendUnavailableError(
                f"SGLang server {url} is unreachable: {type(exc).__name__}"
            ) from None
        if answer.status_code != 200:
            raise BackendUnavailableError(
                f"SGLang server {url} is not healthy: /health answered {answer.status_code}"
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

    def _post(self, url: str, body: dict[str, Any], count: int) -> list[Any]:
        try:
            answer = self._requests.post(f"{url}/generate", json=body, timeout=self._timeout)
        except self._requests.RequestException as exc:
            raise BackendUnavailableError(
                f"SGLang server {url} failed the request: {type(exc).__name__}"
            ) from None
        try:
            rows = answer.json()
        except ValueError:
            rows = None
        if answer.status_code == 400 and error_message(rows):
            raise InvalidInputError(f"SGLang server {url} refused: {error_message(rows)}")
        if answer.status_code != 200:
            raise BackendUnavailableError(
                f"SGLang server {url} answered HTTP {answer.status_code}: {answer.text[:200]}"
            )
        if rows is None:
            raise SchemaMismatchError(f"SGLang server {url} answered non-JSON")
        if isinstance(rows, dict):
            rows = [rows]
        if not isinstance(rows, list) or len(rows) != count:
            got = len(rows) if isinstance(rows, list) else type(rows).__name__
            raise SchemaMismatchError(
                f"SGLang server {url} answered {got} rows for {count} prompts"
            )
        return rows

    def _capture_batch(
        self, tasks: Sequence[PromptTask], encoded: list[tuple[list[int], list[int]]]
    ) -> list[CapturedSample]:
        if self._capture == "mooncake":
            return self._capture_written(tasks, encoded)
        body = build_request(encoded)
        last_rows = self._post(self._url, body, len(tasks))
        aux_rows = self._post(self._aux_url, body, len(tasks))
        h, dtype = self._info.hidden_size, _DTYPES[self._info.dtype]
        samples = []
        for task, (ids, mask), last_row, aux_row in zip(
            tasks, encoded, last_rows, aux_rows, strict=True
        ):
            last = prefill_block(
                last_row,
                where=f"task {task.task_id!r} from {self._url}",
                num_tokens=len(ids),
                width=h,
                what=f"the post-norm last hidden state, H={h}",
            )
            aux = prefill_block(
                aux_row,
                where=f"task {task.task_id!r} from {self._aux_url}",
                num_tokens=len(ids),
                width=3 * h,
                what=(
                    f"3 EAGLE3 aux layers {list(self._info.aux_layer_ids)} concatenated, H={h}; "
                    "is this server running --speculative-algorithm EAGLE3?"
                ),
            )
            tensors = {
                "input_ids": torch.tensor([ids], dtype=torch.int64),
                "loss_mask": torch.tensor([mask], dtype=torch.int64),
                "hidden_state": last.to(dtype).unsqueeze(0).contiguous(),
                "aux_hidden_state": aux.to(dtype).unsqueeze(0).contiguous(),
            }
            samples.append(checked_sample(task.task_id, tensors, self._info))
        return samples

    def _capture_written(
        self, tasks: Sequence[PromptTask], encoded: list[tuple[list[int], list[int]]]
    ) -> list[CapturedSample]:
        """One spec-capture request: the server writes the features, we check what it says."""
        payloads = [
            spec_capture.capture_payload(t.task_id, self._generations.next(), ids, mask)
            for t, (ids, mask) in zip(tasks, encoded, strict=True)
        ]
        body = spec_capture.capture_body([ids for ids, _ in encoded], payloads)
        rows = self._post(self._url, body, len(tasks))
        return [
            CapturedSample(
                task.task_id,
                {},
                written=spec_capture.written_features(
                    row,
                    payload,
                    self.feature_specs(len(ids)),
                    self._info.aux_layer_ids,
                    where=f"task {task.task_id!r} from {self._url}",
                ),
            )
            for task, (ids, _), row, payload in zip(tasks, encoded, rows, payloads, strict=True)
        ]

    def close(self) -> None:
        pass


def open_sglang_engine(target: TargetSection) -> SGLangTargetEngine:
    """The ``sglang`` engine for ``target`` (the config guarantees server_url and model_dir)."""
    if target.server_url is None or target.model_dir is None:
        raise InvalidInputError("the sglang engine needs target.server_url and target.model_dir")
    return SGLangTargetEngine(
        target.server_url,
        target.aux_server_url,
        target.model_dir,
        capture=target.capture,
        dtype="bfloat16" if target.dtype == "auto" else target.dtype,
        aux_layer_ids=target.aux_layer_ids,
        batch_size=target.batch_size,
        timeout_s=target.request_timeout_s,
        version=target.version,
    )
