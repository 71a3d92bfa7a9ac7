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
    requests: list[dict[str, Any]] = field(default_factory=list)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, model: Any, args: StandInArgs) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.model = model
        self.args = args
        self.seen: list[list[int]] = []
        self.lock = threading.Lock()

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
                rows.append({"text": "", "meta_info": meta})
        self._answer(200, rows if batched else rows[0])


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
