"""A hidden-states KV connector for vLLM that works on CPU and GPU (loaded out of tree).

vLLM imports this module in its engine processes through ``--kv-transfer-config
'{"kv_connector": "DataflowHiddenStatesConnector", "kv_connector_module_path":
"dataflow.launch.engines.vllm_connector", ...}'``; nothing of vLLM is patched. It follows vLLM
0.32.0's stock ``ExampleHiddenStatesConnector``
(``vllm/distributed/kv_transfer/kv_connector/v1/example_hidden_states_connector.py``) and keeps
its file format and lock protocol: ``{shared_storage_path}/{req_id}.safetensors`` holding
``hidden_states`` ``[T, n_ids, H]`` (model dtype, in the order of the speculative config's
``eagle_aux_hidden_state_layer_ids``) and ``token_ids`` ``[T]``, with a ``.lock`` file the writer
holds (``flock`` ``LOCK_EX``) until the file is complete.

What differs from the stock class:

- the device-to-host copy: stock allocates ``pin_memory=True`` buffers and CUDA streams/events,
  which fail on a CPU-only build; here the copy is an ordinary blocking ``.to("cpu")`` on the
  default stream (correct on GPU too, where it orders after the forward that wrote the cache);
- ``request_finished`` also answers what the server captures (``dataflow`` key of the
  response's ``kv_transfer_params``: layer ids, dtype, hidden size, model path), so a client can
  refuse a server started for another model, other layer ids or another dtype;
- a request whose save was submitted before the stock ``wait_for_save`` pre-created its lock
  (the write and the pre-creation can fall in one engine step) does not keep a second lock
  held for ever: such a lock is released, and removed once its capture has been read.

Store mode (``target.vllm.capture_mode: store``; the server started with
``kv_connector_extra_config.dataflow_store_capture: true``): a request whose
``kv_transfer_params`` carry ``dataflow_store`` (:func:`~dataflow.launch.engines.vllm_wire.store_target`:
store URI, sample id, reserved generation, steward, loss mask, tokens kept) gets no file and no
lock: the worker builds the sample's four EAGLE3 features itself (the three aux layers
concatenated, the target's final norm applied to the last id, the token ids, the loss mask)
and stages them into the run's feature store under the sample's key, written in place
(``store.stage_writer``, see :mod:`dataflow.store.staging`: on ``shm://`` the tensors view the
staged segment, so the captured streams are copied once, cache -> store, in the engine step;
the final norm and the publish run on the write thread); ``request_finished`` answers their
names, shapes and dtypes (``dataflow_store.features``) for the client to check and the producer
to adopt. A ``dir://`` store's token comes from ``DATAFLOW_STORE_TOKEN`` in the server's
environment. A server started without ``dataflow_store_capture`` answers
``dataflow_store.refused`` and writes nothing.

Only this module imports vLLM; the client engine (:mod:`dataflow.launch.engines.vllm`) never
does.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
    extract_from_kv_cache,
)

from dataflow.contracts import FeatureSpec
from dataflow.launch.engines.vllm_wire import TIMINGS_ENV
from dataflow.store.staging import StagedWrite

_SAVED_KEPT = 4096
STORE_MARK = "dataflow-store:"
"""Prefix of a PendingSave ``filename`` that names a store target instead of a file."""
TOKEN_ENV = "DATAFLOW_STORE_TOKEN"
_log = logging.getLogger(__name__)


class _Done:
    """Stands in for a CUDA event whose copy has already completed (the copy is blocking)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


def server_facts(vllm_config: Any) -> dict[str, Any]:
    """What this server captures: the facts a client checks before trusting its features."""
    spec = vllm_config.speculative_config.draft_model_config.hf_config
    model = vllm_config.model_config
    return {
        "layer_ids": [int(i) for i in getattr(spec, "eagle_aux_hidden_state_layer_ids", [])],
        "dtype": str(model.dtype).removeprefix("torch."),
        "hidden_size": int(model.get_hidden_size()),
        "model": str(model.model),
    }


def _record_timing(mode: str, nbytes: int, step_s: float, write_s: float) -> None:
    """One JSON line per save into ``$DATAFLOW_CONNECTOR_TIMINGS`` when set (benchmarks read
    it): the mode, the bytes, the seconds spent in the engine step and on the write thread.
    """
    path = os.environ.get(TIMINGS_ENV)
    if not path:
        return
    import json

    line = json.dumps({"mode": mode, "bytes": nbytes, "step_s": step_s, "write_s": write_s})
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


def feature_specs(num_tokens: int, facts: dict[str, Any]) -> dict[str, FeatureSpec]:
    """The :func:`feature_answer` features as specs (what ``stage_writer`` is given)."""
    return {
        name: FeatureSpec(name, tuple(meta["shape"]), meta["dtype"])
        for name, meta in feature_answer(num_tokens, facts).items()
    }


def feature_answer(num_tokens: int, facts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Names, shapes and dtypes of the four features a store-mode capture stages."""
    t, h, dtype = num_tokens, int(facts["hidden_size"]), str(facts["dtype"])
    aux = max(len(facts["layer_ids"]) - 1, 0)
    return {
        "input_ids": {"shape": [1, t], "dtype": "int64"},
        "loss_mask": {"shape": [1, t], "dtype": "int64"},
        "hidden_state": {"shape": [1, t, h], "dtype": dtype},
        "aux_hidden_state": {"shape": [1, t, aux * h], "dtype": dtype},
    }


class DataflowHiddenStatesConnector(ExampleHiddenStatesConnector):
    """The stock hidden-states connector with a device-neutral copy and self-describing answers.

    Guarantees (beyond the stock class): works on CPU-only vLLM builds; each finished request's
    ``kv_transfer_params`` carry ``hidden_states_path`` and ``dataflow`` (see
    :func:`server_facts`); the ``.lock`` protocol is the stock one (the lock is created and held
    before the client can see the path, released once the file is complete).
    """

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._facts = server_facts(vllm_config)
        # req_id -> capture filename of each submitted save (the newest _SAVED_KEPT of them).
        self._saved: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._store_capture = bool(
            self._kv_transfer_config.get_from_extra_config("dataflow_store_capture", False)
        )
        self._targets: dict[str, dict[str, Any]] = {}  # scheduler: req_id -> store target
        self._refused: dict[str, str] = {}  # scheduler: req_id -> why store mode was refused
        self._stores: dict[str, Any] = {}  # worker: uri -> open store
        self._stores_lock = threading.Lock()
        self._norm: Any = None
        self._eps = float(getattr(vllm_config.model_config.hf_config, "rms_norm_eps", 1e-6))
        self._model_dir = str(vllm_config.model_config.model)

    # ------------------------------------------------------------------ store mode (worker)

    def _store(self, uri: str) -> Any:
        with self._stores_lock:
            store = self._stores.get(uri)
            if store is None:
                from dataflow.store import open_store

                options: dict[str, Any] = {}
                if uri.startswith("dir://"):
                    options = {"create": False, "token": os.environ.get(TOKEN_ENV) or None}
                store = self._stores[uri] = open_store(uri, **options)
            return store

    def _norm_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self._norm is None:
            from dataflow.launch.engines.vllm_wire import read_norm_weight

            self._norm = read_norm_weight(self._model_dir).to(dtype)
        return self._norm

    def _stage_in_place(self, target: dict[str, Any], pending: PendingSave) -> None:
        """Store mode, in the engine step (the blocks are freed after it): open the staged
        sample's writable tensors and copy the captured streams from the cache straight into
        them (the only copy of the bulk bytes); the final norm and the publish run on the
        write thread. A failure stages nothing (the client's wait times out and says so).
        """
        started = time.perf_counter()
        try:
            keep = min(
                int(target.get("keep_tokens") or pending.token_ids.shape[0]),
                int(pending.token_ids.shape[0]),
            )
            mask = list(target["loss_mask"])[:keep]
            mask += [1] * (keep - len(mask))  # generated tokens are trained on
            staged = self._store(str(target["uri"])).stage_writer(
                str(target["sample_id"]),
                int(target["generation"]),
                feature_specs(keep, self._facts),
                steward=str(target["steward"]),
            )
        except Exception:
            _log.exception("dataflow store capture of %s failed", target.get("sample_id"))
            return
        try:
            out = staged.tensors
            out["input_ids"][0].copy_(pending.token_ids[:keep])
            out["loss_mask"][0].copy_(torch.tensor(mask, dtype=torch.int64))
            hidden = out["hidden_state"][0]
            aux = out["aux_hidden_state"][0].view(keep, -1, hidden.shape[-1])
            self._copy_capture(pending.block_ids, keep, aux, hidden)
        except Exception:
            staged.discard()
            _log.exception("dataflow store capture of %s failed", target.get("sample_id"))
            return
        copied = time.perf_counter()
        future = self._executor.submit(self._publish_staged, target, staged, started, copied)
        self._req_copy_events[pending.req_id] = _Done()
        self._req_futures[pending.req_id] = future
        future.add_done_callback(lambda f, rid=pending.req_id: self._on_write_done(rid, f))

    def _copy_capture(
        self, block_ids: list[int], keep: int, aux: torch.Tensor, last: torch.Tensor
    ) -> None:
        """Copy the first ``keep`` tokens' captured streams out of the cache (``[blocks, ids,
        block_size, H]``): ids but the last into ``aux`` ``[T, ids - 1, H]``, the last (id L,
        before the final norm) into ``last`` ``[T, H]``.
        """
        cache, size = self._kv_cache, self._block_size
        assert cache is not None
        if cache.device.type == "cpu":  # block by block: no gathered intermediate
            for i, block in enumerate(block_ids[: -(-keep // size)]):
                lo = i * size
                n = min(size, keep - lo)
                aux[lo : lo + n].copy_(cache[block, :-1, :n].transpose(0, 1))
                last[lo : lo + n].copy_(cache[block, -1, :n])
            return
        blocks = torch.tensor(block_ids, dtype=torch.long)
        offsets = torch.arange(0, size, dtype=torch.long)
        slots = (offsets.reshape(1, -1) + blocks.reshape(-1, 1) * size).flatten()
        hidden = extract_from_kv_cache(cache, slots.to(cache.device), keep)  # on the device
        aux.copy_(hidden[:, :-1])  # one device-to-host copy each, into the staged memory
        last.copy_(hidden[:, -1])

    def _publish_staged(
        self, target: dict[str, Any], staged: StagedWrite, started: float, copied: float
    ) -> None:
        from dataflow.launch.engines.vllm_wire import final_norm

        try:
            # The views were made in the engine step, under inference mode: so is their update.
            with torch.inference_mode():
                hidden = staged.tensors["hidden_state"]
                hidden.copy_(final_norm(hidden, self._norm_weight(hidden.dtype), self._eps))
            staged.publish()
        except Exception:  # the client's wait for the staged sample times out and says so
            staged.discard()
            _log.exception("dataflow store capture of %s failed", target.get("sample_id"))
            return
        nbytes = sum(t.numel() * t.element_size() for t in staged.tensors.values())
        _record_timing("store", nbytes, copied - started, time.perf_counter() - copied)

    def _submit_async_write(self, pending: PendingSave) -> None:
        if not self._is_tp_rank_zero:
            return
        assert self._kv_cache is not None
        if pending.filename.startswith(STORE_MARK):
            import json

            assert pending.req_id not in self._req_futures, "two saves for one request id"
            self._stage_in_place(json.loads(pending.filename[len(STORE_MARK) :]), pending)
            return
        started = time.perf_counter()
        block_ids = torch.tensor(pending.block_ids, dtype=torch.long)
        offsets = torch.arange(0, self._block_size, dtype=torch.long)
        slots = (offsets.reshape(1, -1) + block_ids.reshape(-1, 1) * self._block_size).flatten()
        num_tokens = int(pending.token_ids.shape[0])
        hidden = extract_from_kv_cache(
            self._kv_cache, slots.to(self._kv_cache.device), num_tokens
        ).to("cpu", copy=True)
        assert pending.req_id not in self._req_futures, "two saves for one request id"
        tensors = {"hidden_states": hidden.contiguous(), "token_ids": pending.token_ids.clone()}
        import fcntl
        import os

        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        if lock_fd is None and self.use_lock:
            lock_fd = os.open(pending.filename + ".lock", os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        done = _Done()
        future = self._executor.submit(
            self._write_timed, tensors, done, pending.filename, lock_fd, started
        )
        self._req_copy_events[pending.req_id] = done
        self._req_futures[pending.req_id] = future
        future.add_done_callback(lambda f, rid=pending.req_id: self._on_write_done(rid, f))
        self._saved[pending.req_id] = pending.filename
        while len(self._saved) > _SAVED_KEPT:
            self._saved.popitem(last=False)

    def _write_timed(
        self, tensors: dict[str, torch.Tensor], done: _Done, path: str, lock: Any, started: float
    ) -> None:
        copied = time.perf_counter()
        self._write_tensors(tensors, done, path, lock)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        _record_timing("file", nbytes, copied - started, time.perf_counter() - copied)

    def wait_for_save(self) -> None:
        """The stock lock pre-creation, then: a lock it took for a request already saved is
        closed (released), and its file removed when the capture was already read (the
        client removes the capture and its lock; this lock would otherwise outlive both).
        """
        super().wait_for_save()
        for req_id in [r for r in self._lock_fds if r in self._saved]:
            os.close(self._lock_fds.pop(req_id))
            filename = self._saved[req_id]
            if not os.path.exists(filename):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(filename + ".lock")

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        """The stock metadata, but only requests that asked for a capture (they carry
        ``kv_transfer_params``) get a lock file and a capture; plain completions get none.
        """
        meta = super().build_connector_meta(scheduler_output)
        for new_req in scheduler_output.scheduled_new_reqs:
            extra = new_req.sampling_params.extra_args if new_req.sampling_params else None
            params = (extra or {}).get("kv_transfer_params")
            if not params:
                meta.new_req_filenames.pop(new_req.req_id, None)
                self._request_filenames.pop(new_req.req_id, None)
                continue
            target = params.get("dataflow_store") if isinstance(params, dict) else None
            if target is None:
                continue
            meta.new_req_filenames.pop(new_req.req_id, None)  # store mode: no file, no lock
            if not self._store_capture or not isinstance(target, dict):
                self._request_filenames.pop(new_req.req_id, None)
                self._refused[new_req.req_id] = (
                    "this server was started without kv_connector_extra_config."
                    "dataflow_store_capture (dataflow-launch target vllm-command CONFIG prints "
                    "the command for target.vllm.capture_mode: store)"
                    if not self._store_capture
                    else "kv_transfer_params.dataflow_store must be an object"
                )
                continue
            import json

            self._targets[new_req.req_id] = target
            self._request_filenames[new_req.req_id] = STORE_MARK + json.dumps(target)
        return meta

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        refused = self._refused.pop(request.request_id, None)
        if refused is not None:
            return False, {"dataflow_store": {"refused": refused}, "dataflow": dict(self._facts)}
        target = self._targets.pop(request.request_id, None)
        delay, params = super().request_finished(request, block_ids)
        if params is not None and target is not None:
            pending = self._pending_saves.get(request.request_id)
            count = 0 if pending is None else int(pending.token_ids.shape[0])
            keep = min(count, int(target.get("keep_tokens") or count))
            params = {
                "dataflow_store": {
                    "sample_id": target.get("sample_id"),
                    "generation": target.get("generation"),
                    "features": feature_answer(keep, self._facts),
                },
                "dataflow": dict(self._facts),
            }
        elif params is not None:
            params = {**params, "dataflow": dict(self._facts)}
        return delay, params
