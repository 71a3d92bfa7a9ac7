"""SpecForge's server-capture protocol: the request and the checked answer (``target.capture:
mooncake``).

Sources (sgl-project/SpecForge at commit a6b6b023):

- ``specforge/inference/adapters/server_capture.py`` (``SGLangServerCaptureAdapter``): the
  ``/generate`` body is ``{"input_ids": [[...], ...], "extra_key": [uuid per prompt],
  "sampling_params": {"temperature": 0.0, "max_new_tokens": 1}, "spec_capture": [one dict per
  prompt]}``; each dict is ``{"store_id", "sample_id", "gen", "replace", "features": {"aux":
  <name>, "last_hidden": <name>}, "passthrough": [{"name", "data", "shape": [1, T, ...],
  "dtype": "int64"}]}``. A fresh ``extra_key`` per request puts it in its own radix-cache
  namespace, so the whole prompt is prefilled even with the radix cache on. A row without
  ``meta_info["spec_capture"]`` means an unpatched server or one started without
  ``--enable-spec-capture``; ``{"error": ...}`` is a failed write (retryable); the answer's
  ``sample_id`` / ``store_id`` / ``gen`` must be the request's; a capture shorter than the prompt
  is corrupt; ``aux_layer_ids`` absent while layers are requested is refused.
- ``patches/sglang/v0.5.14/spec-capture.patch`` (SGLang v0.5.14): ``server_args.py`` adds
  ``--enable-spec-capture``, ``--spec-capture-aux-layer-ids`` (default: the model's EAGLE3
  layers) and ``--spec-capture-method`` (default ``eagle3``: the ids go where the draft config's
  ``eagle_aux_hidden_state_layer_ids`` would, so id k is the output of decoder layer k, as ours);
  ``scheduler.py`` refuses to start without ``--chunked-prefill-size -1``;
  ``spec_capture_sink.py`` writes ``aux`` = the captured layers concatenated ``[1, T, 3H]`` and
  ``last_hidden`` = the post-final-norm state ``[1, T, H]`` (``logits_processor.py``:
  ``last_hidden_states``), both in the model dtype, and the passthrough tensors, at
  ``{store_id}/{sample_id}/g{gen}/{name}`` (headerless; see
  :mod:`dataflow.store.mooncake_external`); ``meta_info["spec_capture"] = {"sample_id",
  "store_id", "gen", "aux_layer_ids", "features": {name: {"shape", "dtype"}}}``.

Here ``store_id`` is the ``mooncake://`` store's key prefix, ``sample_id`` the task id and
``gen`` a fresh generation (SpecForge keeps ``gen = 1`` and sets ``replace`` on a retry; a fresh
generation per attempt needs no replace), so the server writes exactly where the store's
consumer reads.

Deployment: the sink connects with the ``MOONCAKE_*`` environment of the SERVER process
(``spec_capture_sink.py`` ``_connect``): ``MOONCAKE_MASTER_SERVER_ADDR`` = the ``host:port`` of
the run's ``mooncake://`` URI, ``MOONCAKE_METADATA_SERVER`` / ``MOONCAKE_PROTOCOL`` the same as
the store's settings (e.g. ``P2PHANDSHAKE``, ``tcp``), ``MOONCAKE_GLOBAL_SEGMENT_SIZE`` large
enough for the features in flight. The objects live in the server's segment
(``replica_num = 1``): if the server process dies, its uncommitted and unconsumed samples go
with it (a later ``get`` is a ``NotFoundError``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from dataflow.contracts import BackendUnavailableError, FeatureSpec, SchemaMismatchError
from dataflow.launch.engines.base import ServerWritten
from dataflow.store.mooncake_wire import PREFIX as STORE_ID

ARTIFACTS = {"aux": "aux_hidden_state", "last_hidden": "hidden_state"}
"""The patched server's artifacts → this project's feature names."""


class Generations:
    """Generations for server-written samples: wall-clock microseconds, strictly increasing, so
    a restarted producer never reuses a key (the rule of ``MooncakeFeatureStore.put``).
    """

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        """A generation greater than every one handed out before."""
        self._last = max(self._last + 1, time.time_ns() // 1000)
        return self._last


def capture_payload(
    sample_id: str, generation: int, ids: Sequence[int], mask: Sequence[int]
) -> dict[str, Any]:
    """One prompt's ``spec_capture`` dict (``input_ids`` and ``loss_mask`` pass through)."""
    t = len(ids)
    return {
        "store_id": STORE_ID,
        "sample_id": sample_id,
        "gen": generation,
        "replace": False,  # a new generation per attempt: nothing to replace
        "features": dict(ARTIFACTS),
        "passthrough": [
            {"name": "input_ids", "data": list(ids), "shape": [1, t], "dtype": "int64"},
            {"name": "loss_mask", "data": list(mask), "shape": [1, t], "dtype": "int64"},
        ],
    }


def capture_body(
    prompts: Sequence[Sequence[int]], payloads: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The ``/generate`` body of a spec-capture batch (prefill only, greedy, own cache keys)."""
    return {
        "input_ids": [list(ids) for ids in prompts],
        "extra_key": [uuid.uuid4().hex for _ in prompts],
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 1},
        "spec_capture": list(payloads),
    }


def written_features(
    row: Any,
    payload: Mapping[str, Any],
    expected: Mapping[str, FeatureSpec],
    aux_layer_ids: Sequence[int],
    where: str,
) -> ServerWritten:
    """Check one answer row's ``meta_info.spec_capture`` against the request and the engine's
    feature specs; return what the server wrote.

    ``SchemaMismatchError`` names the problem (no capture result, wrong identity, other layers,
    a feature missing or of another shape or dtype); ``BackendUnavailableError`` carries the
    server's own write error.
    """
    meta = row.get("meta_info") if isinstance(row, dict) else None
    result = meta.get("spec_capture") if isinstance(meta, dict) else None
    if isinstance(result, list) and len(result) == 1:
        result = result[0]
    if not isinstance(result, dict) or not result:
        raise SchemaMismatchError(
            f"{where}: the answer has no meta_info.spec_capture; is the server SGLang with "
            "SpecForge's spec-capture patch, started with --enable-spec-capture?"
        )
    if result.get("error"):
        raise BackendUnavailableError(f"{where}: the server failed to write: {result['error']}")
    identity = {k: result.get(k) for k in ("store_id", "sample_id", "gen")}
    wanted = {k: payload[k] for k in ("store_id", "sample_id", "gen")}
    if identity != wanted:
        raise SchemaMismatchError(f"{where}: the server wrote {identity}, not {wanted}")
    layers = result.get("aux_layer_ids")
    if layers is None or [int(x) for x in layers] != list(aux_layer_ids):
        raise SchemaMismatchError(
            f"{where}: the server captured aux layers {layers}, expected {list(aux_layer_ids)}; "
            "start it with --spec-capture-aux-layer-ids " + " ".join(str(i) for i in aux_layer_ids)
        )
    features = result.get("features")
    if not isinstance(features, dict) or set(features) != set(expected):
        got = sorted(features) if isinstance(features, dict) else features
        raise SchemaMismatchError(f"{where}: the server wrote {got}, expected {sorted(expected)}")
    specs: dict[str, FeatureSpec] = {}
    for name, spec in expected.items():
        meta_f = features[name]
        shape = tuple(int(d) for d in meta_f.get("shape", ()))
        dtype = str(meta_f.get("dtype"))
        if shape != spec.shape or dtype != spec.dtype:
            hint = (
                "; the capture is shorter than the prompt (not one full prefill)"
                if len(shape) >= 2 and shape[1] != spec.shape[1]
                else ""
            )
            raise SchemaMismatchError(
                f"{where}: feature {name!r} was written as {dtype}{list(shape)}, expected "
                f"{spec.dtype}{list(spec.shape)}{hint}"
            )
        specs[name] = spec
    return ServerWritten(int(payload["gen"]), specs)
