"""The sglang engine against stand-ins of two stock SGLang servers (``sglang_standin``): a plain
one (post-norm last hidden state) and one running EAGLE3 (the aux layers), both computing real
features with the tiny built-in target, so values are checked against the in-process engine.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack

import pytest
import torch
from dataflow_testing.ports import free_port
from launch_helpers import make_tasks
from sglang_standin import NOT_ENABLED_MESSAGE, StandInArgs, standin_server

from dataflow.contracts import BackendUnavailableError, InvalidInputError, SchemaMismatchError
from dataflow.launch.config import TargetSection
from dataflow.launch.engines import FEATURE_NAMES, TargetEngine, open_engine
from dataflow.launch.engines.sglang import SGLangTargetEngine, build_request


@pytest.fixture
def servers(tiny_engine):
    """``(plain_args, eagle3_args, open_client)``; change args before opening to misconfigure."""
    plain = StandInArgs()
    eagle3 = StandInArgs(eagle3_layer_ids=tiny_engine.info.aux_layer_ids)
    with ExitStack() as stack:
        urls = {}

        def open_client(model_dir, **target):
            if not urls:
                urls["plain"] = stack.enter_context(standin_server(tiny_engine.model, plain))
                urls["aux"] = stack.enter_context(standin_server(tiny_engine.model, eagle3))
            section = dict(
                engine="sglang",
                server_url=urls["plain"],
                aux_server_url=urls["aux"],
                model_dir=str(model_dir),
                dtype="float32",
                batch_size=2,
                request_timeout_s=30,
            )
            return open_engine(TargetSection(**{**section, **target}))

        yield plain, eagle3, open_client


def test_features_from_two_stock_servers_equal_the_in_process_engine(
    servers, tiny_engine, saved_model_dir
):
    plain, eagle3, open_client = servers
    client = open_client(saved_model_dir)
    assert isinstance(client, TargetEngine)
    tasks = make_tasks(tiny_engine, 3)
    remote = client.capture(tasks)
    local = [tiny_engine.capture([task])[0] for task in tasks]
    for a, b in zip(remote, local, strict=True):
        assert a.task_id == b.task_id
        for name in FEATURE_NAMES:
            assert torch.equal(a.tensors[name], b.tensors[name]), name
    # batch_size 2 → two batched requests to each server, prefill only, greedy
    expected = [
        build_request([(list(t.payload["input_ids"]), []) for t in tasks[:2]]),
        build_request([(list(tasks[2].payload["input_ids"]), [])]),
    ]
    assert plain.requests == expected and eagle3.requests == expected
    assert expected[0]["return_hidden_states"] is True
    assert expected[0]["sampling_params"] == {"temperature": 0.0, "max_new_tokens": 1}


def test_target_head_is_read_from_the_model_directory(servers, tiny_engine, saved_model_dir):
    remote, local = servers[2](saved_model_dir).target_head(), tiny_engine.target_head()
    assert torch.equal(remote.embed_weight, local.embed_weight)
    assert torch.equal(remote.lm_head_weight, local.lm_head_weight)


def test_a_server_without_the_flag_is_refused_with_sglangs_message(
    servers, tiny_engine, saved_model_dir
):
    plain, _, open_client = servers
    plain.enable_return_hidden_states = False
    with pytest.raises(InvalidInputError, match="refused: " + NOT_ENABLED_MESSAGE[:40]):
        open_client(saved_model_dir).capture(make_tasks(tiny_engine, 1))


def test_a_plain_server_as_the_aux_server_is_a_width_mismatch(
    servers, tiny_engine, saved_model_dir
):
    _, eagle3, open_client = servers
    eagle3.eagle3_layer_ids = None  # not running EAGLE3: it answers the last hidden state
    with pytest.raises(SchemaMismatchError, match=r"is 32 wide, expected 96 .*EAGLE3"):
        open_client(saved_model_dir).capture(make_tasks(tiny_engine, 1))


def test_the_radix_cache_shortens_the_block_and_is_named(servers, tiny_engine, saved_model_dir):
    plain, _, open_client = servers
    plain.disable_radix_cache = False
    client = open_client(saved_model_dir)
    task = make_tasks(tiny_engine, 1)
    client.capture(task)  # first time: every token computed
    with pytest.raises(SchemaMismatchError, match="--disable-radix-cache and --chunked-prefill"):
        client.capture(task)  # the cached prefix has no rows


def test_chunked_prefill_keeps_only_the_last_chunk_and_is_named(
    servers, tiny_engine, saved_model_dir
):
    _, eagle3, open_client = servers
    eagle3.chunked_prefill_size = 4
    with pytest.raises(SchemaMismatchError, match=r"rows for a \d+-token prompt"):
        open_client(saved_model_dir).capture(make_tasks(tiny_engine, 1))


def test_the_config_requires_both_servers():
    with pytest.raises(ValueError, match="aux_server_url: required by the sglang engine"):
        TargetSection(engine="sglang", server_url="http://x", model_dir="/m")


def test_unreachable_server_is_a_clear_error(saved_model_dir):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BackendUnavailableError, match=f"SGLang server {url} is unreachable"):
        SGLangTargetEngine(url, url, str(saved_model_dir), timeout_s=2)


def test_missing_requests_package_is_a_clear_error(monkeypatch, saved_model_dir):
    monkeypatch.setitem(sys.modules, "requests", None)  # as if the extra were not installed
    with pytest.raises(
        BackendUnavailableError, match=r"needs the 'requests' package: .*dataflow-launch\[sglang\]"
    ):
        SGLangTargetEngine("http://127.0.0.1:1", "http://127.0.0.1:1", str(saved_model_dir))


def test_missing_transformers_is_a_clear_error(monkeypatch):
    from dataflow.launch.builtin.tokenizer import load_builtin_tokenizer

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(BackendUnavailableError, match=r"dataflow-launch\[hf\]"):
        load_builtin_tokenizer()
