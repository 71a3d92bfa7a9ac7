"""What the ``vllm`` engine sends to and reads from a stock vLLM 0.32.0 OpenAI server.

Facts from vLLM's sources (``vllm/entrypoints/openai/completion/protocol.py``,
``vllm/model_executor/models/llama.py`` ``_maybe_add_hidden_state``,
``vllm/distributed/kv_transfer/kv_connector/v1/example_hidden_states_connector.py``):

- ``/v1/completions`` takes a prompt as a list of token ids and ``kv_transfer_params`` (handed
  to the KV connector); the response carries the connector's ``kv_transfer_params`` back.
- The ``extract_hidden_states`` speculative method captures the residual stream at the layer
  ids of ``eagle_aux_hidden_state_layer_ids``, where id ``k`` is the stream after ``k`` decoder
  layers (0 = embeddings, ``L`` = the final output BEFORE the final norm). This project's aux
  id ``k`` is the output of decoder layer ``k``, i.e. vLLM id ``k + 1``; the engine asks for the
  three aux ids plus ``L`` and applies the target's final norm itself.
- The file ``{req_id}.safetensors`` holds ``hidden_states`` ``[T, n_ids, H]`` and
  ``token_ids`` ``[T]``; its ``.lock`` is held (``flock`` exclusive) until the file is complete.
  With ``include_output_tokens`` the tokens are prompt + output minus the last output token
  (never fed back, so it has no hidden state).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dataflow.contracts import (
    BackendUnavailableError,
    FeatureSpec,
    InvalidInputError,
    SchemaMismatchError,
)

CONNECTOR_CLASS = "DataflowHiddenStatesConnector"
CONNECTOR_MODULE = "dataflow.launch.engines.vllm_connector"
NORM_KEY = "model.norm.weight"
TIMINGS_ENV = "DATAFLOW_CONNECTOR_TIMINGS"
"""When set in the server's environment: a file the connector appends one JSON line per save to
(mode, bytes, seconds in the engine step and on its write thread), for benchmarks."""
STORE_SCHEMES = ("shm", "dir", "mooncake")
"""Stores the connector can write into from the server process (store mode)."""


def vllm_layer_ids(aux_layer_ids: Sequence[int], num_layers: int) -> list[int]:
    """VLLM ids to capture: our aux ids + 1 (output of decoder layer k), then ``num_layers``."""
    return [int(k) + 1 for k in aux_layer_ids] + [int(num_layers)]


def speculative_config(layer_ids: Sequence[int]) -> dict[str, Any]:
    """The ``--speculative-config`` value that captures ``layer_ids``."""
    return {
        "method": "extract_hidden_states",
        "num_speculative_tokens": 1,
        "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(layer_ids)}},
    }


def kv_transfer_config(capture_dir: str, *, store_capture: bool = False) -> dict[str, Any]:
    """The ``--kv-transfer-config`` value loading this project's connector (file mode; with
    ``store_capture`` it also accepts store-mode requests).
    """
    extra: dict[str, Any] = {"shared_storage_path": capture_dir}
    if store_capture:
        extra["dataflow_store_capture"] = True
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_producer",
        "kv_connector_extra_config": extra,
    }


def server_args(
    model_dir: str,
    *,
    layer_ids: Sequence[int],
    dtype: str,
    capture_dir: str,
    host: str,
    port: int,
    eager: bool,
    max_model_len: int | None = None,
    extra_args: Sequence[str] = (),
    store_capture: bool = False,
) -> list[str]:
    """The arguments after ``python -m vllm.entrypoints.openai.api_server``."""
    args = [
        "--model",
        model_dir,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--no-enable-prefix-caching",
        "--speculative-config",
        json.dumps(speculative_config(layer_ids), separators=(",", ":")),
        "--kv-transfer-config",
        json.dumps(
            kv_transfer_config(capture_dir, store_capture=store_capture), separators=(",", ":")
        ),
    ]
    if eager:
        args.append("--enforce-eager")
    if max_model_len is not None:
        args += ["--max-model-len", str(max_model_len)]
    return args + list(extra_args)


def completion_body(
    model: str,
    prompt: Sequence[int],
    *,
    max_tokens: int = 1,
    temperature: float = 0.0,
    seed: int | None = None,
    include_output_tokens: bool = False,
) -> dict[str, Any]:
    """One ``/v1/completions`` request over token ids, asking the connector for a capture."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(prompt),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "return_token_ids": True,
        "kv_transfer_params": {"include_output_tokens": include_output_tokens},
    }
    if seed is not None:
        body["seed"] = seed
    return body


def read_capture(path: str, *, timeout_s: float, where: str) -> dict[str, torch.Tensor]:
    """The tensors of one capture file, read under a shared ``flock`` on its ``.lock``, then
    both files removed. Raises :class:`BackendUnavailableError` when the lock or file does not
    appear within ``timeout_s`` (the server's worker died before writing it).
    """
    from safetensors.torch import load_file

    lock = path + ".lock"
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(lock) and not os.path.exists(path):
        if time.monotonic() >= deadline:
            raise BackendUnavailableError(
                f"{where}: capture file {path} never appeared within {timeout_s} s "
                "(did the server's worker die?)"
            )
        time.sleep(0.005)
    try:
        if os.path.exists(lock):
            fd = os.open(lock, os.O_RDONLY)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise BackendUnavailableError(
                                f"{where}: capture file {path} still locked by its writer "
                                f"after {timeout_s} s"
                            ) from None
                        time.sleep(0.002)
                tensors = _load(load_file, path, where)
            finally:
                os.close(fd)
        else:
            tensors = _load(load_file, path, where)
    finally:
        for leftover in (path, lock):
            Path(leftover).unlink(missing_ok=True)
    return tensors


def _load(load_file: Any, path: str, where: str) -> dict[str, torch.Tensor]:
    try:
        return dict(load_file(path, device="cpu"))
    except FileNotFoundError:
        raise BackendUnavailableError(
            f"{where}: capture file {path} is missing after its lock was released "
            "(did the server's worker die?)"
        ) from None
    except Exception as exc:  # a torn or foreign file
        raise SchemaMismatchError(f"{where}: capture file {path} is unreadable ({exc})") from None


def final_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA's RMSNorm as transformers computes it (fp32 statistics, cast back, then scaled)."""
    dtype = hidden.dtype
    x = hidden.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(dtype) * x.to(dtype)


def read_norm_weight(model_dir: str) -> torch.Tensor:
    """The target's final RMSNorm weight (``model.norm.weight``) from its model directory."""
    from safetensors import safe_open

    from dataflow.launch.engines.target_files import _weight_files

    files = _weight_files(Path(model_dir))
    if NORM_KEY not in files:
        raise InvalidInputError(f"target.model_dir {model_dir!r} has no {NORM_KEY!r} tensor")
    with safe_open(str(files[NORM_KEY]), framework="pt") as handle:
        return handle.get_tensor(NORM_KEY)


def eagle3_from_capture(
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    prompt_mask: Sequence[int],
    norm: torch.Tensor,
    eps: float,
) -> dict[str, torch.Tensor]:
    """The four EAGLE3 features of one capture (``hidden`` ``[T, 4, H]``: three aux ids then
    ``L``; ``tokens`` ``[T]``): aux layers concatenated, the final norm applied to id ``L``,
    the loss mask = ``prompt_mask`` then 1 for every token past it (generated ones).
    """
    t, h = int(hidden.shape[0]), int(hidden.shape[2])
    mask = list(prompt_mask)[:t] + [1] * max(t - len(prompt_mask), 0)
    return {
        "input_ids": tokens.to(torch.int64).reshape(1, t).contiguous(),
        "loss_mask": torch.tensor([mask], dtype=torch.int64),
        "hidden_state": final_norm(hidden[:, 3, :], norm, eps).unsqueeze(0).contiguous(),
        "aux_hidden_state": hidden[:, :3, :].reshape(1, t, 3 * h).contiguous(),
    }


def store_target(
    uri: str,
    sample_id: str,
    generation: int,
    steward: str,
    loss_mask: Sequence[int],
    keep_tokens: int | None,
) -> dict[str, Any]:
    """``kv_transfer_params.dataflow_store`` of one store-mode request: where the connector
    stages the sample (store URI, sample id, the producer's reserved generation and its
    steward identity), the prompt's loss mask and how many tokens to keep (None: all).
    """
    return {
        "uri": uri,
        "sample_id": sample_id,
        "generation": int(generation),
        "steward": steward,
        "loss_mask": [int(m) for m in loss_mask],
        "keep_tokens": keep_tokens,
    }


def answered_specs(answer: Any, where: str) -> dict[str, FeatureSpec]:
    """The feature specs a store-mode answer (``dataflow_store.features``) names; a malformed
    answer is a ``SchemaMismatchError``.
    """
    if not isinstance(answer, dict) or not answer:
        raise SchemaMismatchError(f"{where}: the answer names no staged features ({answer!r})")
    specs = {}
    for name, meta in answer.items():
        try:
            specs[name] = FeatureSpec(
                name, tuple(int(d) for d in meta["shape"]), str(meta["dtype"])
            )
        except (KeyError, TypeError, ValueError, InvalidInputError) as exc:
            raise SchemaMismatchError(
                f"{where}: staged feature {name!r} is described as {meta!r} ({exc})"
            ) from None
    return specs
