"""A stand-in for a stock SGLang server's ``/generate`` with hidden states, on CPU.

It runs a real transformers forward of the given model and answers in SGLang's JSON shape with
SGLang's semantics; each rule cites the SGLang source it follows (sgl-project/sglang, as stored
in the public index; the engine's :mod:`dataflow.launch.engines.sglang_wire` lists the commits):

- ``GET /health`` → 200 (``entrypoints/http_server.py`` ``health``).
- Without ``--enable-return-hidden-states`` a request with ``return_hidden_states`` → HTTP 400
  ``{"error": {"message": ...}}`` (``tokenizer_manager.py`` ``_validate_one_request``;
  ``http_server.py`` ``_create_error_response``).
- Plain server: the rows are the final-norm output (``models/llama.py`` ``LlamaModel.forward``;
  ``layers/logits_processor.py`` FULL mode, ``hidden_states_to_store = hidden_states``).
- ``eagle3_layer_ids`` set (a server running EAGLE3): the rows are the aux layers concatenated
  INSTEAD (``logits_processor.py``: ``torch.cat(aux_hidden_states, dim=-1)``), layer id k captured
  as the input of layer k + 1 (``set_eagle3_layers_to_capture``: ``val + 1``;
  ``LlamaModel.forward`` appends ``hidden_states + residual`` before the layer) = HF
  ``hidden_states[k + 1]``.
- Only computed tokens have rows (``batch_result_processor.py`` ``_append_prefill_hidden_states``:
  ``hidden_states[offset : offset + extend_input_len]``): with the radix cache on, a prefix
  shared with an earlier prompt is not recomputed (at least one token always is); with
  ``chunked_prefill_size`` > 0 only the last chunk is stored (middle chunks: ``store=False``).
- ``meta_info["hidden_states"]`` is ``[prefill_block]`` for ``max_new_tokens=1``
  (``tokenizer_manager.py``); a batched ``input_ids`` answers a list of rows in order.

``enable_spec_capture`` turns it into SGLang v0.5.14 with SpecForge's spec-capture patch
(sgl-project/SpecForge a6b6b023, ``patches/sglang/v0.5.14/spec-capture.patch``):

- ``scheduler.py``: with ``--enable-spec-capture`` and ``chunked_prefill_size != -1`` the server
  refuses to start (``ValueError``, raised here by :func:`standin_server`).
- ``io_struct.py``: ``spec_capture`` is a batch-level list, one dict per prompt; a server without
  the flag has no sink (``maybe_init_sink``) and answers without ``meta_info["spec_capture"]``.
- ``spec_capture_sink.py`` ``put_samples``: ``aux`` = the capture layers concatenated (the EAGLE3
  rule above: id k = HF ``hidden_states[k + 1]``; ``--spec-capture-aux-layer-ids``), ``last_hidden``
  = the post-norm final state (``logits_processor.py`` ``last_hidden_states``), each
  ``unsqueeze(0)`` in the model dtype, then the passthrough tensors
  (``torch.tensor(data, dtype).reshape(shape)``), written headerless and hard-pinned by
  :class:`dataflow_testing.spec_capture.SpecCaptureWriter` (a real Mooncake client); the result
  dict goes to ``meta_info["spec_capture"]`` (``tokenizer_manager.py``); a failed write answers
  ``{"sample_id", "error"}`` (``batch_result_processor.py`` ``_complete_spec_capture_batch``).
- ``bad_capture`` (tests only) corrupts what is written or answered, as a broken server would.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

NOT_ENABLED_MESSAGE = (
    "The server is not configured to return the hidden states. "
    "Please set `--enable-return-hidden-states` to enable this feature."
)


@dataclass
class StandInArgs:
    """The server flags the stand-in honours (SGLang ``ServerArgs`` names)."""

    enable_return_hidden_states: bool = True
    disable_radix_cache: bool = True
    chunked_prefill_size: int = -1
    eagle3_layer_ids: Sequence[int] | None = None
    enable_spec_capture: bool = False
    spec_capture_aux_layer_ids: Sequence[int] | None = None
    mooncake_uri: str = ""
    """Where the spec-capture sink connects (SpecForge reads ``MOONCAKE_*`` env vars)."""
    bad_capture: str = ""
    """Tests: ``skip:<name>`` writes no object for it and ``trunc:<name>`` one token too few
    (both still answering the true spec); ``dtype:<name>`` answers float16 for it; ``short``
    captures (and answers) one token fewer than the prompt; ``fail`` fails the write."""
    requests: list[dict[str, Any]] = field(default_factory=list)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, model: Any, args: StandInArgs) -> None:
        if args.enable_spec_capture and args.chunked_prefill_size != -1:
            raise ValueError(
                "--enable-spec-capture requires --chunked-prefill-size -1 (single-pass prefill) "
                "so captured hidden states cover the whole sequence"
            )
        super().__init__(("127.0.0.1", 0), _Handler)
        self.model = model
        self.args = args
        self.seen: list[list[int]] = []
        self.lock = threading.Lock()
        self.writer: Any = None

    @torch.no_grad()
    def spec_capture(self, ids: list[int], spec: dict[str, Any]) -> dict[str, Any]:
        """Write one prompt's artifacts as the patched sink does; return its result dict."""
        if self.writer is None:  # the sink connects on first use (maybe_init_sink is lazy)
            from dataflow_testing.spec_capture import SpecCaptureWriter

            self.writer = SpecCaptureWriter(
                self.args.mooncake_uri, aux_layer_ids=self.args.spec_capture_aux_layer_ids
            )
        out = self.model.model(
            input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False
        )
        layers = self.args.spec_capture_aux_layer_ids or ()
        aux = torch.cat([out.hidden_states[k + 1][0] for k in layers], -1)
        last = out.last_hidden_state[0]
        bad = self.args.bad_capture
        if bad == "short":
            aux, last = aux[1:], last[1:]
        features = spec.get("features") or {}
        named: dict[str, torch.Tensor] = {}
        if "aux" in features:
            named[features["aux"]] = aux.unsqueeze(0)
        if "last_hidden" in features:
            named[features["last_hidden"]] = last.unsqueeze(0)
        for item in spec.get("passthrough") or []:
            dtype = getattr(torch, str(item.get("dtype", "int64")))
            named[str(item["name"])] = torch.tensor(item["data"], dtype=dtype).reshape(
                [int(d) for d in item["shape"]]
            )
        truth = {n: {"shape": list(x.shape), "dtype": _dtype_name(x)} for n, x in named.items()}
        if bad.startswith("skip:"):
            named.pop(bad.removeprefix("skip:"))
        if bad.startswith("trunc:"):
            name = bad.removeprefix("trunc:")
            named[name] = named[name][:, :-1]
        try:
            if bad == "fail":
                raise RuntimeError("spec-capture batch_put_from failed for 1/4 keys")
            result = self.writer.put_samples([(spec, named)])[0]
        except Exception as exc:
            return {"sample_id": spec.get("sample_id"), "error": str(exc)}
        if bad.startswith(("skip:", "trunc:")):  # the answer claims what should be there
            result["features"] = truth
        if bad.startswith("dtype:"):
            result["features"][bad.removeprefix("dtype:")]["dtype"] = "float16"
        return result

    def cached_prefix(self, ids: list[int]) -> int:
        if self.args.disable_radix_cache:
            return 0
        best = 0
        for old in self.seen:
            n = 0
            while n < min(len(old), len(ids)) and old[n] == ids[n]:
                n += 1
            best = max(best, n)
        self.seen.append(ids)
        return min(best, len(ids) - 1)  # the last token is always computed

    @torch.no_grad()
    def rows_for(self, ids: list[int]) -> list[list[float]]:
        out = self.model.model(
            input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False
        )
        if self.args.eagle3_layer_ids is None:
            block = out.last_hidden_state[0]
        else:
            block = torch.cat([out.hidden_states[k + 1][0] for k in self.args.eagle3_layer_ids], -1)
        start = self.cached_prefix(ids)
        size = self.args.chunked_prefill_size
        if size > 0 and len(ids) - start > size:
            start += ((len(ids) - start - 1) // size) * size  # only the last chunk is stored
        return block[start:].tolist()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(200 if self.path == "/health" else 404, {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.args.requests.append(body)
        if self.path != "/generate":
            self._answer(404, {})
            return
        if body.get("return_hidden_states") and not self.server.args.enable_return_hidden_states:
            self._answer(400, {"error": {"message": NOT_ENABLED_MESSAGE}})
            return
        batched = isinstance(body["input_ids"][0], list)
        prompts = body["input_ids"] if batched else [body["input_ids"]]
        rows = []
        with self.server.lock:
            for i, ids in enumerate(prompts):
                meta: dict[str, Any] = {
                    "id": f"req-{len(self.server.args.requests)}-{i}",
                    "prompt_tokens": len(ids),
                    "completion_tokens": 1,
                }
                if body.get("return_hidden_states"):
                    meta["hidden_states"] = [self.server.rows_for(list(ids))]
                captures = body.get("spec_capture")
                if self.server.args.enable_spec_capture and captures is not None:
                    spec = captures[i] if isinstance(captures, list) else captures
                    meta["spec_capture"] = self.server.spec_capture(list(ids), spec)
                rows.append({"text": "", "meta_info": meta})
        self._answer(200, rows if batched else rows[0])


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


@contextmanager
def standin_server(model: Any, args: StandInArgs) -> Iterator[str]:
    """Serve ``model`` on loopback as SGLang would with ``args``; yields the base URL."""
    server = _Server(model, args)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        if server.writer is not None:
            server.writer.close()
