"""The ``vllm`` engine: EAGLE3 features from a stock vLLM server (0.32.0, CPU or GPU builds).

The server runs the ``extract_hidden_states`` speculative method with this project's
hidden-states connector (:mod:`dataflow.launch.engines.vllm_connector`, loaded out of tree by
``kv_connector_module_path``); see :mod:`dataflow.launch.engines.vllm_wire` for the vLLM files
each fact is read from. Per prompt the engine sends one ``/v1/completions`` request over the
prompt's token ids (``max_tokens=1``, or with :class:`Regeneration` the target's own response
with ``include_output_tokens``), waits for the capture file under its lock, then removes it.

Features equal the ``hf`` engine's on the same weights: the server captures vLLM ids
``aux + 1`` (output of decoder layer k) and ``L`` (pre-final-norm); ``hidden_state`` is the
target's final RMSNorm (weight read from the model directory) applied to id ``L``.

Errors: a server for another model, other layer ids, another dtype or hidden size →
:class:`SchemaMismatchError` naming both sides; an unreachable, failing or dying server (no
answer within ``request_timeout_s``, or a capture file that never appears) →
:class:`BackendUnavailableError`, which the producer answers by returning the leased prompts to
the ledger (retried when a server is back, FAILED after ``producer.max_attempts``); a request
vLLM refuses (HTTP 400, e.g. a prompt over ``max_model_len``) → :class:`InvalidInputError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from dataflow.contracts import (
    BackendUnavailableError,
    InvalidInputError,
    PromptTask,
    SchemaMismatchError,
)
from dataflow.launch.config import TargetSection
from dataflow.launch.engines.base import CapturedSample, Regeneration
from dataflow.launch.engines.features import checked_sample
from dataflow.launch.engines.payload import encode_payload
from dataflow.launch.engines.served import ServedModelDirEngine, served_target_info
from dataflow.launch.engines.vllm_wire import (
    completion_body,
    final_norm,
    read_capture,
    vllm_layer_ids,
)
from dataflow.launch.extras import require

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
NORM_KEY = "model.norm.weight"
MAX_RESTARTS = 3
"""A managed server that dies is restarted at most this many times in one run."""


def _read_norm_weight(model_dir: str) -> torch.Tensor:
    from safetensors import safe_open

    from dataflow.launch.engines.target_files import _weight_files

    files = _weight_files(Path(model_dir))
    if NORM_KEY not in files:
        raise InvalidInputError(f"target.model_dir {model_dir!r} has no {NORM_KEY!r} tensor")
    with safe_open(str(files[NORM_KEY]), framework="pt") as handle:
        return handle.get_tensor(NORM_KEY)


def _writer_done(path: str) -> bool:
    """Whether the capture at ``path`` is complete (its lock is absent or free)."""
    lock = path + ".lock"
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


class VLLMTargetEngine(ServedModelDirEngine):
    """Captures features from a running vLLM server; implements :class:`TargetEngine`.

    Guarantees: the server is probed at construction (``/health`` and ``/v1/models``: a server
    for another model is refused before any capture); one checked sample per task, in task
    order, up to ``batch_size`` requests in flight; every capture file and its lock removed
    after reading (also on errors); the embedding, LM head and final norm come from the same
    local model directory the server loaded.
    """

    def __init__(
        self,
        server_url: str,
        model_dir: str,
        *,
        dtype: str = "bfloat16",
        aux_layer_ids: Sequence[int] | None = None,
        batch_size: int = 4,
        timeout_s: float = 300.0,
        version: str | None = None,
        regeneration: Regeneration | None = None,
        tokenizer: Any | None = None,
        server: Any | None = None,
        capture_dir: str | None = None,
    ) -> None:
        self._requests: Any = require("requests")
        self._url = server_url.rstrip("/")
        self._model_dir = model_dir
        self._timeout = timeout_s
        self._batch_size = batch_size
        self._regeneration = regeneration
        self._server = server
        self._capture_dir = capture_dir
        self._orphans: set[str] = set()
        self._orphans_lock = threading.Lock()
        self._info, config = served_target_info(model_dir, aux_layer_ids, dtype, version)
        self._layer_ids = vllm_layer_ids(self._info.aux_layer_ids, self._info.num_layers)
        self._eps = float(config.get("rms_norm_eps", 1e-6))
        self._norm = _read_norm_weight(model_dir).to(_DTYPES[dtype])
        self._tokenizer = tokenizer
        self._served_model = self._probe()
        self._pool = ThreadPoolExecutor(max_workers=batch_size, thread_name_prefix="vllm-capture")

    # ----------------------------------------------------------------- server checks

    def _get(self, path: str) -> Any:
        try:
            answer = self._requests.get(f"{self._url}{path}", timeout=min(self._timeout, 10.0))
        except self._requests.RequestException as exc:
            raise BackendUnavailableError(
                f"vLLM server {self._url} is unreachable: {type(exc).__name__}"
            ) from None
        if answer.status_code != 200:
            raise BackendUnavailableError(
                f"vLLM server {self._url}: {path} answered HTTP {answer.status_code}"
            )
        return answer

    def _probe(self) -> str:
        self._get("/health")
        try:
            models = self._get("/v1/models").json()["data"]
        except (ValueError, KeyError, TypeError):
            raise SchemaMismatchError(
                f"vLLM server {self._url}: /v1/models is not vLLM's"
            ) from None
        mine = os.path.realpath(self._model_dir)
        for entry in models:
            root = entry.get("root") or entry.get("id")
            if isinstance(root, str) and os.path.realpath(root) == mine:
                return str(entry["id"])
        served = [m.get("root") or m.get("id") for m in models]
        raise SchemaMismatchError(
            f"vLLM server {self._url} serves {served}, but target.model_dir is {mine!r}: start "
            "the server for this model (dataflow-launch target vllm-command CONFIG prints how)"
        )

    def _check_facts(self, task_id: str, facts: Any) -> None:
        """Refuse a capture from a server configured differently from this target."""
        where = f"task {task_id!r} from vLLM server {self._url}"
        if not isinstance(facts, dict):
            raise SchemaMismatchError(
                f"{where}: the answer has no kv_transfer_params.dataflow; is the server running "
                "the dataflow connector (dataflow.launch.engines.vllm_connector)?"
            )
        expected = {
            "layer_ids": self._layer_ids,
            "dtype": self._info.dtype,
            "hidden_size": self._info.hidden_size,
        }
        for key, want in expected.items():
            if facts.get(key) != want:
                raise SchemaMismatchError(
                    f"{where}: the server captures {key}={facts.get(key)!r}, this target needs "
                    f"{key}={want!r} (aux_layer_ids {list(self._info.aux_layer_ids)} → vLLM ids "
                    "k+1, plus the last layer)"
                )

    # ----------------------------------------------------------------- engine contract

    @property
    def server(self) -> Any | None:
        """The managed server this engine owns (None for a server started by hand)."""
        return self._server

    def _supervise(self) -> None:
        """Restart a managed server that died (at most ``MAX_RESTARTS`` times in a run)."""
        server = self._server
        if server is None or server.alive:
            return
        if server.starts > MAX_RESTARTS:
            raise BackendUnavailableError(
                f"the managed vLLM server died {server.starts} times; giving up:\n"
                f"{server.log_tail()}"
            )
        server.start()

    def capture(self, tasks: Sequence[PromptTask]) -> list[CapturedSample]:
        self._supervise()
        needs_tokenizer = any("messages" in t.payload for t in tasks)
        tokenizer = self.tokenizer if needs_tokenizer else None
        encoded = [encode_payload(t, tokenizer, self._info.vocab_size) for t in tasks]
        futures = [
            self._pool.submit(self._capture_one, task, ids, mask)
            for task, (ids, mask) in zip(tasks, encoded, strict=True)
        ]
        samples = [f.result() for f in futures]
        if self._orphans:
            self.sweep_orphans()
        return samples

    def generate(self, prompt: Sequence[int], max_tokens: int) -> list[int]:
        """Plain greedy completion token ids (no capture), for comparisons."""
        body = completion_body(self._served_model, prompt, max_tokens=max_tokens)
        del body["kv_transfer_params"]
        return list(self._post("plain completion", body)["choices"][0]["token_ids"])

    def _post(self, task_id: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self._url}/v1/completions"
        try:
            answer = self._requests.post(url, json=body, timeout=self._timeout)
        except self._requests.Timeout:
            with self._orphans_lock:  # the server may still write its capture: swept later
                self._orphans.add(str(body.get("request_id", "")))
            raise BackendUnavailableError(
                f"task {task_id!r}: vLLM server {self._url} did not answer within "
                f"target.request_timeout_s={self._timeout} s"
            ) from None
        except self._requests.RequestException as exc:
            raise BackendUnavailableError(
                f"task {task_id!r}: vLLM server {self._url} failed the request: "
                f"{type(exc).__name__}"
            ) from None
        if answer.status_code == 400:
            raise InvalidInputError(
                f"task {task_id!r}: vLLM server {self._url} refused: {answer.text[:300]}"
            )
        if answer.status_code != 200:
            raise BackendUnavailableError(
                f"task {task_id!r}: vLLM server {self._url} answered HTTP {answer.status_code}: "
                f"{answer.text[:200]}"
            )
        try:
            reply: dict[str, Any] = answer.json()
        except ValueError:
            raise SchemaMismatchError(f"vLLM server {self._url} answered non-JSON") from None
        return reply

    def _capture_one(self, task: PromptTask, ids: list[int], mask: list[int]) -> CapturedSample:
        regen = self._regeneration
        if regen is None:
            body = completion_body(self._served_model, ids, max_tokens=1)
        else:
            # One token more than kept: the last output token is never fed back, so it has no
            # hidden state; asking for max_new_tokens + 1 keeps max_new_tokens generated tokens.
            body = completion_body(
                self._served_model,
                ids,
                max_tokens=regen.max_new_tokens + 1,
                temperature=regen.temperature,
                seed=regen.seed if regen.temperature > 0 else None,
                include_output_tokens=True,
            )
        body["request_id"] = f"df-{uuid.uuid4().hex}"
        reply = self._post(task.task_id, body)
        params = reply.get("kv_transfer_params") or {}
        path = params.get("hidden_states_path") if isinstance(params, dict) else None
        if not isinstance(path, str):
            raise SchemaMismatchError(
                f"task {task.task_id!r}: vLLM server {self._url} answered without "
                "kv_transfer_params.hidden_states_path; start it with the dataflow connector "
                "(dataflow-launch target vllm-command CONFIG prints the command)"
            )
        where = f"task {task.task_id!r} from vLLM server {self._url}"
        try:
            self._check_facts(task.task_id, params.get("dataflow"))
        except SchemaMismatchError:
            read_capture(path, timeout_s=self._timeout, where=where)  # removes the file
            raise
        data = read_capture(path, timeout_s=self._timeout, where=where)
        return self._sample(task, ids, mask, data, where)

    def _sample(
        self,
        task: PromptTask,
        ids: list[int],
        mask: list[int],
        data: dict[str, torch.Tensor],
        where: str,
    ) -> CapturedSample:
        hidden, tokens = data.get("hidden_states"), data.get("token_ids")
        if hidden is None or tokens is None:
            raise SchemaMismatchError(f"{where}: the capture holds {sorted(data)}")
        h, n = self._info.hidden_size, len(self._layer_ids)
        if hidden.dim() != 3 or hidden.shape[1] != n or hidden.shape[2] != h:
            raise SchemaMismatchError(
                f"{where}: captured hidden_states is {list(hidden.shape)}, expected "
                f"[T, {n}, {h}] (vLLM layer ids {self._layer_ids})"
            )
        if hidden.shape[0] != tokens.shape[0]:
            raise SchemaMismatchError(
                f"{where}: {hidden.shape[0]} hidden-state rows for {tokens.shape[0]} tokens"
            )
        token_list = [int(t) for t in tokens.tolist()]
        if token_list[: len(ids)] != ids:
            raise SchemaMismatchError(
                f"{where}: the server captured other tokens than the prompt's (a cached "
                "prefix? start the server with --no-enable-prefix-caching)"
            )
        if self._regeneration is None:
            if len(token_list) != len(ids):
                raise SchemaMismatchError(
                    f"{where}: {len(token_list)} captured tokens for a {len(ids)}-token prompt"
                )
        else:
            token_list = token_list[: len(ids) + self._regeneration.max_new_tokens]
            hidden = hidden[: len(token_list)]
            mask = list(mask) + [1] * (len(token_list) - len(ids))
        dtype = _DTYPES[self._info.dtype]
        if hidden.dtype != dtype:
            raise SchemaMismatchError(
                f"{where}: the server captured {str(hidden.dtype).removeprefix('torch.')}, "
                f"target.dtype is {self._info.dtype}"
            )
        aux = hidden[:, :3, :].reshape(hidden.shape[0], 3 * h)
        last = final_norm(hidden[:, 3, :], self._norm, self._eps)
        tensors = {
            "input_ids": torch.tensor([token_list], dtype=torch.int64),
            "loss_mask": torch.tensor([mask], dtype=torch.int64),
            "hidden_state": last.unsqueeze(0).contiguous(),
            "aux_hidden_state": aux.unsqueeze(0).contiguous(),
        }
        return checked_sample(task.task_id, tensors, self._info)

    def sweep_orphans(self) -> int:
        """Remove the complete capture files of requests this engine gave up on (timed out);
        returns how many requests are still unaccounted for. Needs the capture directory
        (known for a managed server, else ``target.vllm.capture_dir``).
        """
        if self._capture_dir is None:
            return 0
        with self._orphans_lock:
            orphans = set(self._orphans)
        for rid in orphans:
            for path in glob.glob(
                os.path.join(glob.escape(self._capture_dir), f"*{rid}*.safetensors")
            ):
                if _writer_done(path):
                    for leftover in (path, path + ".lock"):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(leftover)
                    with self._orphans_lock:
                        self._orphans.discard(rid)
        with self._orphans_lock:
            return len(self._orphans)

    def close(self) -> None:
        """Stop capturing; a managed server is stopped (no vLLM process is left)."""
        self.sweep_orphans()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._server is not None:
            self._server.stop()


def open_vllm_engine(
    target: TargetSection, *, regeneration: Regeneration | None = None
) -> VLLMTargetEngine:
    """The ``vllm`` engine for ``target``: against ``target.server_url``, or — when it is unset —
    a managed server started here (stopped by the engine's ``close``).
    """
    if target.model_dir is None:
        raise InvalidInputError("the vllm engine needs target.model_dir")
    server = None
    url = target.server_url
    if url is None:
        from dataflow.launch.engines.vllm_server import ManagedVLLMServer

        server = ManagedVLLMServer(target)
        server.start()
        url = server.url
    try:
        return _engine(target, url, regeneration, server)
    except BaseException:
        if server is not None:
            server.stop()
        raise


def _engine(
    target: TargetSection, url: str, regeneration: Regeneration | None, server: Any
) -> VLLMTargetEngine:
    from dataflow.launch.precision import choose_dtype

    assert target.model_dir is not None
    return VLLMTargetEngine(
        url,
        target.model_dir,
        dtype=choose_dtype(target.dtype, target.device).dtype,
        aux_layer_ids=target.aux_layer_ids,
        batch_size=target.batch_size,
        timeout_s=target.request_timeout_s,
        version=target.version,
        regeneration=regeneration,
        server=server,
        capture_dir=server.capture_dir if server is not None else target.vllm.capture_dir,
    )
