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
  refuse a server started for another model, other layer ids or another dtype.

Only this module imports vLLM; the client engine (:mod:`dataflow.launch.engines.vllm`) never
does.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
    extract_from_kv_cache,
)


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

    def _submit_async_write(self, pending: PendingSave) -> None:
        if not self._is_tp_rank_zero:
            return
        assert self._kv_cache is not None
        block_ids = torch.tensor(pending.block_ids, dtype=torch.long)
        offsets = torch.arange(0, self._block_size, dtype=torch.long)
        slots = (offsets.reshape(1, -1) + block_ids.reshape(-1, 1) * self._block_size).flatten()
        num_tokens = int(pending.token_ids.shape[0])
        hidden = extract_from_kv_cache(
            self._kv_cache, slots.to(self._kv_cache.device), num_tokens
        ).to("cpu", copy=True)
        tensors = {"hidden_states": hidden.contiguous(), "token_ids": pending.token_ids.clone()}
        assert pending.req_id not in self._req_futures, "two saves for one request id"
        import fcntl
        import os

        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        if lock_fd is None and self.use_lock:
            lock_fd = os.open(pending.filename + ".lock", os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        done = _Done()
        future = self._executor.submit(
            self._write_tensors, tensors, done, pending.filename, lock_fd
        )
        self._req_copy_events[pending.req_id] = done
        self._req_futures[pending.req_id] = future
        future.add_done_callback(lambda f, rid=pending.req_id: self._on_write_done(rid, f))

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        """The stock metadata, but only requests that asked for a capture (they carry
        ``kv_transfer_params``) get a lock file and a capture; plain completions get none.
        """
        meta = super().build_connector_meta(scheduler_output)
        for new_req in scheduler_output.scheduled_new_reqs:
            extra = new_req.sampling_params.extra_args if new_req.sampling_params else None
            if not (extra or {}).get("kv_transfer_params"):
                meta.new_req_filenames.pop(new_req.req_id, None)
                self._request_filenames.pop(new_req.req_id, None)
        return meta

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        delay, params = super().request_finished(request, block_ids)
        if params is not None:
            params = {**params, "dataflow": dict(self._facts)}
        return delay, params
