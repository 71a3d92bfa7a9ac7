"""The ``vllm`` engine: EAGLE3 features from a stock vLLM server (0.32.0, CPU or GPU builds).

The server runs the ``extract_hidden_states`` speculative method with this project's
hidden-states connector (:mod:`dataflow.launch.engines.vllm_connector`, loaded out of tree by
``kv_connector_module_path``); see :mod:`dataflow.launch.engines.vllm_wire` for the vLLM files
each fact is read from. Per prompt the engine sends one ``/v1/completions`` request over the
prompt's token ids (``max_tokens=1``, or with :class:`Regeneration` the target's own response
with ``include_output_tokens``), waits for the capture file under its lock, then removes it
(``target.vllm.capture_mode: file``). With ``capture_mode: store`` it reserves a generation of
the sample in the run's feature store and names it in the request; the connector stages the
four features there from the server process and answers their specs; the engine checks them
(and the staged token ids) as strictly as a file, and the producer adopts the staged sample
(``store.adopt``): no file, no copy through the producer.

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
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from dataflow.contracts import (
    BackendUnavailableError,
    FeatureSpec,
    InvalidInputError,
    NotFoundError,
    PromptTask,
    SchemaMismatchError,
)
from dataflow.launch.config import TargetSection
from dataflow.launch.engines.base import CapturedSample, Regeneration, ServerWritten
from dataflow.launch.engines.features import checked_sample
from dataflow.launch.engines.payload import encode_payload
from dataflow.launch.engines.served import ServedModelDirEngine, served_target_info
from dataflow.launch.engines.vllm_wire import (
    STORE_SCHEMES,
    answered_specs,
    completion_body,
    final_norm,
    read_capture,
    read_norm_weight,
    store_target,
    vllm_layer_ids,
)
from dataflow.launch.extras import require

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STAGED_POLL_S = 0.002
MAX_RESTARTS = 3
"""A managed server that dies is restarted at most this many times in one run."""


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
        capture_mode: str = "file",
        store_uri: str | None = None,
        store_options: dict[str, Any] | None = None,
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
        self._norm = read_norm_weight(model_dir).to(_DTYPES[dtype])
        self._tokenizer = tokenizer
        self._store = self._open_store(capture_mode, store_uri, store_options)
        try:
            self._served_model = self._probe()
        except BaseException:
            if self._store is not None:
                self._store.close()
            raise
        self._pool = ThreadPoolExecutor(max_workers=batch_size, thread_name_prefix="vllm-capture")

    @staticmethod
    def _open_store(mode: str, uri: str | None, options: dict[str, Any] | None) -> Any | None:
        """Store mode: this engine's own instance of the run's store (reserves, checks)."""
        if mode == "file":
            return None
        if mode != "store":
            raise InvalidInputError(
                f"target.vllm.capture_mode must be 'file' or 'store', got {mode!r}"
            )
        from dataflow.contracts.uris import parse_store_uri
        from dataflow.store import open_store

        if uri is None or parse_store_uri(uri).scheme not in STORE_SCHEMES:
            raise InvalidInputError(
                "target.vllm.capture_mode: store needs the run's store to be one the vLLM "
                f"server can write into (shm://, dir:// or mooncake://), got {uri!r}"
            )
        return open_store(uri, **(options or {}))

    @property
    def capture_mode(self) -> str:
        """``file`` or ``store`` (``target.vllm.capture_mode``)."""
        return "file" if self._store is None else "store"

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
        samples: list[CapturedSample] = []
        error: BaseException | None = None
        for future in futures:  # every request settles before capture returns or raises
            try:
                samples.append(future.result())
            except BaseException as exc:
                error = error or exc
        if error is not None:
            self._unstage(samples)  # store mode: the batch's other samples are never adopted
            raise error
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
        if self._store is not None:
            return self._capture_staged(task, ids, mask, body)
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

    def _capture_staged(
        self, task: PromptTask, ids: list[int], mask: list[int], body: dict[str, Any]
    ) -> CapturedSample:
        """Store mode: the connector stages the sample at a generation reserved here; the
        answer's specs and the staged token ids are checked; the producer adopts it.
        """
        from dataflow.store.staging import steward

        store = self._store
        assert store is not None
        sid = task.task_id
        generation = store.reserve(sid)
        regen = self._regeneration
        keep = None if regen is None else len(ids) + regen.max_new_tokens
        body["kv_transfer_params"]["dataflow_store"] = store_target(
            store.uri, sid, generation, steward(), mask, keep
        )
        where = f"task {sid!r} from vLLM server {self._url}"
        accepted = False
        try:
            reply = self._post(sid, body)
            params = reply.get("kv_transfer_params") or {}
            params = params if isinstance(params, dict) else {}
            answer = params.get("dataflow_store")
            if not isinstance(answer, dict) or answer.get("refused"):
                why = answer.get("refused") if isinstance(answer, dict) else "no dataflow_store"
                raise SchemaMismatchError(f"{where}: store-mode capture refused: {why}")
            accepted = True  # the connector stages it: a refusal below waits to remove it
            self._check_facts(sid, params.get("dataflow"))
            if (answer.get("sample_id"), answer.get("generation")) != (sid, generation):
                raise SchemaMismatchError(
                    f"{where}: the server staged {answer.get('sample_id')!r} generation "
                    f"{answer.get('generation')!r}, not {sid!r} generation {generation}"
                )
            specs = answered_specs(answer.get("features"), where)
            self._check_staged(sid, ids, generation, specs, where)
        except BaseException as exc:
            # A refused capture leaves nothing: the connector may still be staging it.
            if accepted and isinstance(exc, SchemaMismatchError):
                self._staged_exists(sid, generation, wait_s=self._timeout)
            with contextlib.suppress(Exception):
                store.unstage(sid, generation)
            raise
        return CapturedSample(sid, {}, written=ServerWritten(generation, specs, layout="staged"))

    def _unstage(self, samples: Sequence[CapturedSample]) -> None:
        store = self._store
        for sample in samples:
            if store is not None and sample.written is not None:
                with contextlib.suppress(Exception):
                    store.unstage(sample.task_id, sample.written.generation)

    def _staged_exists(self, sid: str, generation: int, *, wait_s: float) -> bool:
        """Whether a staged sample is there (whatever its specs), waiting up to ``wait_s``."""
        store = self._store
        assert store is not None
        probe = {"input_ids": FeatureSpec("input_ids", (1, 0), "int64")}
        deadline = time.monotonic() + wait_s
        while True:
            try:
                store.staged_tensors(sid, generation, probe)
                return True
            except SchemaMismatchError:
                return True  # there, with other specs than the probe's
            except NotFoundError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(STAGED_POLL_S)

    def _check_staged(
        self,
        sid: str,
        ids: list[int],
        generation: int,
        specs: dict[str, Any],
        where: str,
    ) -> None:
        """The same checks as a capture file's: length, shapes, dtype, then the token ids."""
        shape: tuple[int, ...] = tuple(specs["input_ids"].shape) if "input_ids" in specs else ()
        count = int(shape[-1]) if len(shape) == 2 else -1
        if self._regeneration is None and count != len(ids):
            raise SchemaMismatchError(
                f"{where}: {count} captured tokens for a {len(ids)}-token prompt"
            )
        if self._regeneration is not None and count < len(ids):
            raise SchemaMismatchError(
                f"{where}: {count} captured tokens, fewer than the {len(ids)}-token prompt"
            )
        expected = self.feature_specs(count)
        if specs != expected:
            shown = {n: f"{s.dtype}{list(s.shape)}" for n, s in specs.items()}
            wanted = {n: f"{s.dtype}{list(s.shape)}" for n, s in expected.items()}
            raise SchemaMismatchError(
                f"{where}: the server staged {shown}, this target needs {wanted} (vLLM layer ids "
                f"{self._layer_ids}, target.dtype {self._info.dtype})"
            )
        store = self._store
        assert store is not None
        wanted_ids = {"input_ids": expected["input_ids"]}
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                staged = store.staged_tensors(sid, generation, wanted_ids)["input_ids"]
                break
            except NotFoundError:
                if time.monotonic() >= deadline:
                    raise BackendUnavailableError(
                        f"{where}: the staged sample (generation {generation}) never appeared "
                        f"in {store.uri} within {self._timeout} s (did the server's worker "
                        "die, or can it not reach the store?)"
                    ) from None
                time.sleep(STAGED_POLL_S)
        if [int(t) for t in staged[0, : len(ids)].tolist()] != ids:
            raise SchemaMismatchError(
                f"{where}: the server captured other tokens than the prompt's (a cached "
                "prefix? start the server with --no-enable-prefix-caching)"
            )

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
        if self._store is not None:
            self._store.close()
        if self._server is not None:
            self._server.stop()


def open_vllm_engine(
    target: TargetSection,
    *,
    regeneration: Regeneration | None = None,
    store_uri: str | None = None,
    store_options: dict[str, Any] | None = None,
) -> VLLMTargetEngine:
    """The ``vllm`` engine for ``target``: against ``target.server_url``, or — when it is unset —
    a managed server started here (stopped by the engine's ``close``). ``store_uri`` (and its
    ``open_store`` options) name the run's store, needed by ``target.vllm.capture_mode: store``.
    """
    if target.vllm.capture_mode == "store" and store_uri is None:
        raise InvalidInputError(
            "target.vllm.capture_mode: store needs the run's store URI (open the engine "
            "through the producer, or pass store_uri)"
        )
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
        return _engine(target, url, regeneration, server, store_uri, store_options)
    except BaseException:
        if server is not None:
            server.stop()
        raise


def _engine(
    target: TargetSection,
    url: str,
    regeneration: Regeneration | None,
    server: Any,
    store_uri: str | None,
    store_options: dict[str, Any] | None,
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
        capture_mode=target.vllm.capture_mode,
        store_uri=store_uri,
        store_options=store_options,
    )
