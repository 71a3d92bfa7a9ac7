"""The sglang client against a real HTTP server on loopback that speaks its wire contract.

The server computes real features with the tiny built-in target, so parsing is checked value by
value against the in-process engine; fault modes inject what a misconfigured server answers.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from dataflow_testing.ports import free_port
from launch_helpers import make_tasks

from dataflow.contracts import (
    BackendUnavailableError,
    PromptTask,
    SchemaMismatchError,
)
from dataflow.launch.config import TargetSection
from dataflow.launch.engines import FEATURE_NAMES, TargetEngine, open_engine
from dataflow.launch.engines.sglang import SGLangTargetEngine, build_request


class CaptureServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, engine) -> None:
        super().__init__(("127.0.0.1", 0), CaptureHandler)
        self.engine = engine
        self.mode = "ok"
        self.requests: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class CaptureHandler(BaseHTTPRequestHandler):
    server: CaptureServer

    def log_message(self, *args) -> None:  # keep test output quiet
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
        self.server.requests.append(body)
        mode = self.server.mode
        if mode == "500":
            self._answer(500, {"error": "out of memory"})
            return
        tasks = [
            PromptTask(f"srv-{i}", {"input_ids": ids}, max_length=len(ids))
            for i, ids in enumerate(body["input_ids"])
        ]
        rows = []
        # One prompt per forward, so the test can compare bit for bit with a local capture.
        for sample in (self.server.engine.capture([task])[0] for task in tasks):
            block = torch.cat(
                [sample.tensors["aux_hidden_state"][0], sample.tensors["hidden_state"][0]], dim=-1
            )
            if mode == "narrow":
                block = block[:, :-1]
            meta = {"hidden_states": [block.tolist()], "aux_layer_ids": [1, 3, 4]}
            if mode == "layers":
                meta["aux_layer_ids"] = [2, 3, 4]
            if mode == "stock":
                meta = {"prompt_tokens": sample.num_tokens}
            rows.append({"text": "", "meta_info": meta})
        if mode == "short":
            rows = rows[:-1]
        self._answer(200, rows)


@pytest.fixture(scope="module")
def server(tiny_engine):
    srv = CaptureServer(tiny_engine)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture
def client(server, saved_model_dir):
    server.mode = "ok"
    server.requests.clear()
    return open_engine(
        TargetSection(
            engine="sglang",
            server_url=server.url,
            model_dir=str(saved_model_dir),
            dtype="float32",
            batch_size=2,
            request_timeout_s=30,
        )
    )


def test_features_from_the_server_equal_the_in_process_engine(client, server, tiny_engine):
    assert isinstance(client, TargetEngine)
    assert client.info.aux_layer_ids == tiny_engine.info.aux_layer_ids
    tasks = make_tasks(tiny_engine, 3)
    remote = client.capture(tasks)
    local = [tiny_engine.capture([task])[0] for task in tasks]
    for a, b in zip(remote, local, strict=True):
        assert a.task_id == b.task_id
        for name in FEATURE_NAMES:
            assert torch.equal(a.tensors[name], b.tensors[name]), name
    # batch_size 2 → two requests, each prefill-only and greedy
    assert [len(r["input_ids"]) for r in server.requests] == [2, 1]
    assert server.requests[0] == build_request(
        [(list(t.payload["input_ids"]), []) for t in tasks[:2]]
    )


def test_target_head_is_read_from_the_model_directory(client, tiny_engine):
    remote, local = client.target_head(), tiny_engine.target_head()
    assert torch.equal(remote.embed_weight, local.embed_weight)
    assert torch.equal(remote.lm_head_weight, local.lm_head_weight)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert remote.model_config[key] == local.model_config[key]


@pytest.mark.parametrize(
    ("mode", "error", "match"),
    [
        (
            "narrow",
            SchemaMismatchError,
            r"hidden_states\[0\] has shape \[\d+, 127\], expected \[\d+, 128\]",
        ),
        (
            "layers",
            SchemaMismatchError,
            r"the server captured layers \[2, 3, 4\], expected \[1, 3, 4\]",
        ),
        ("stock", SchemaMismatchError, "no meta_info.hidden_states; is the server launched"),
        ("short", SchemaMismatchError, "answered 1 rows for 2 prompts"),
        ("500", BackendUnavailableError, "answered HTTP 500"),
    ],
)
def test_server_answers_that_break_the_contract(client, server, tiny_engine, mode, error, match):
    server.mode = mode
    with pytest.raises(error, match=match):
        client.capture(make_tasks(tiny_engine, 2))


def test_unreachable_server_is_a_clear_error(saved_model_dir):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BackendUnavailableError, match=f"SGLang server {url} is unreachable"):
        SGLangTargetEngine(url, str(saved_model_dir), timeout_s=2)


def test_missing_requests_package_is_a_clear_error(monkeypatch, saved_model_dir):
    import sys

    monkeypatch.setitem(sys.modules, "requests", None)  # as if the extra were not installed
    with pytest.raises(
        BackendUnavailableError, match=r"needs the 'requests' package: .*dataflow-launch\[sglang\]"
    ):
        SGLangTargetEngine("http://127.0.0.1:1", str(saved_model_dir))


def test_missing_transformers_is_a_clear_error(monkeypatch):
    import sys

    from dataflow.launch.builtin.tokenizer import load_builtin_tokenizer

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(BackendUnavailableError, match=r"dataflow-launch\[hf\]"):
        load_builtin_tokenizer()
