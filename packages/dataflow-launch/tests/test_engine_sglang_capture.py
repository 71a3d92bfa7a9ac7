"""``target.capture: mooncake``: a stand-in of SGLang v0.5.14 with SpecForge's spec-capture patch
(``sglang_standin``, ``enable_spec_capture``) writes the features of a real forward of the tiny
target straight into a REAL mooncake_master; the engine checks the answer, the store adopts the
objects without a put, a second store instance (the consumer) reads them, and they equal the
in-process hf engine's features bit for bit. Bad metadata is refused naming the problem.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest
import torch
from launch_helpers import make_tasks
from sglang_standin import StandInArgs, standin_server

from dataflow.contracts import (
    BackendUnavailableError,
    NotFoundError,
    RunFailedError,
    SchemaMismatchError,
)
from dataflow.launch.config import LaunchConfig, TargetSection
from dataflow.launch.engines import FEATURE_NAMES, open_engine
from dataflow.launch.engines.sglang_capture import STORE_ID
from dataflow.store import mooncake_wire as wire
from dataflow.store import open_store
from dataflow.store.mooncake_client import MooncakeClient
from dataflow.store.mooncake_settings import settings_from_uri

pytestmark = pytest.mark.mooncake


@pytest.fixture(scope="module")
def client(mooncake_master) -> Iterator[MooncakeClient]:
    shared = MooncakeClient.connect(
        settings_from_uri(mooncake_master.uri, {"segment": "64MiB", "buffer": "16MiB"})
    )
    yield shared
    shared.close()


@pytest.fixture
def capture_server(tiny_engine, mooncake_master):
    """``(args, open_client)``: change args before opening to misconfigure the server."""
    args = StandInArgs(
        enable_spec_capture=True,
        spec_capture_aux_layer_ids=tiny_engine.info.aux_layer_ids,
        mooncake_uri=mooncake_master.uri,
    )
    with ExitStack() as stack:

        def open_client(model_dir):
            url = stack.enter_context(standin_server(tiny_engine.model, args))
            section = TargetSection(
                engine="sglang",
                capture="mooncake",
                server_url=url,
                model_dir=str(model_dir),
                dtype="float32",
                batch_size=2,
                request_timeout_s=30,
            )
            return open_engine(section)

        yield args, open_client


def test_server_written_features_are_read_by_the_consumer_and_equal_the_hf_engines(
    capture_server, tiny_engine, saved_model_dir, mooncake_master, client
):
    args, open_client = capture_server
    engine = open_client(saved_model_dir)
    tasks = make_tasks(tiny_engine, 3, prefix="cap")
    samples = engine.capture(tasks)
    body = args.requests[0]
    assert body["sampling_params"] == {"temperature": 0.0, "max_new_tokens": 1}
    assert len(body["extra_key"]) == 2 and len(set(body["extra_key"])) == 2
    spec = body["spec_capture"][0]
    assert spec["store_id"] == STORE_ID == wire.PREFIX and spec["sample_id"] == tasks[0].task_id
    assert spec["features"] == {"aux": "aux_hidden_state", "last_hidden": "hidden_state"}
    assert "return_hidden_states" not in body  # the patch turns it on itself for capture
    producer = open_store(mooncake_master.uri, client=client)
    consumer = open_store(mooncake_master.uri, client=client)
    local = [tiny_engine.capture([task])[0] for task in tasks]
    for task, sample, want in zip(tasks, samples, local, strict=True):
        assert sample.tensors == {} and sample.written is not None  # nothing came through us
        assert sample.num_tokens == want.num_tokens and sample.nbytes == want.nbytes
        ref = producer.adopt_external(
            task.task_id,
            sample.written.generation,
            sample.written.specs,
            {"num_tokens": sample.num_tokens},
        )
        got, handle = consumer.get(ref)
        for name in FEATURE_NAMES:
            assert got[name].dtype == want.tensors[name].dtype, name
            assert torch.equal(got[name], want.tensors[name]), name
        consumer.release(handle)
        assert client.exists([wire.feature_key(task.task_id, ref.generation, "input_ids")]) == [
            False
        ]


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ("dtype:hidden_state", SchemaMismatchError, r"'hidden_state' was written as float16"),
        ("short", SchemaMismatchError, "shorter than the prompt"),
    ],
)
def test_answers_that_disagree_with_the_engines_specs_are_refused(
    capture_server, tiny_engine, saved_model_dir, bad, error, match
):
    args, open_client = capture_server
    args.bad_capture = bad
    with pytest.raises(error, match=match):
        open_client(saved_model_dir).capture(make_tasks(tiny_engine, 1, prefix=f"bad{len(bad)}"))


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ("skip:aux_hidden_state", NotFoundError, "aux_hidden_state: no such object"),
        ("trunc:hidden_state", SchemaMismatchError, r"holds \d+ bytes but feature 'hidden_state'"),
    ],
)
def test_objects_that_disagree_with_the_answer_are_refused_on_adoption(
    capture_server, tiny_engine, saved_model_dir, mooncake_master, client, bad, error, match
):
    args, open_client = capture_server
    args.bad_capture = bad
    task = make_tasks(tiny_engine, 1, prefix="adopt")[0]
    sample = open_client(saved_model_dir).capture([task])[0]  # the answer itself looks right
    store = open_store(mooncake_master.uri, client=client)
    with pytest.raises(error, match=match):
        store.adopt_external(task.task_id, sample.written.generation, sample.written.specs)
    assert store.health().resident_samples == 0
    store.abort(task.task_id, "test")  # what the producer does: the server's objects go
    key = wire.feature_key(task.task_id, sample.written.generation, "input_ids")
    assert client.exists([key]) == [False]


def test_a_server_without_the_flag_or_with_other_layers_is_named(
    capture_server, tiny_engine, saved_model_dir
):
    args, open_client = capture_server
    args.spec_capture_aux_layer_ids = (0, 1, 2)
    engine = open_client(saved_model_dir)
    with pytest.raises(SchemaMismatchError, match="--spec-capture-aux-layer-ids"):
        engine.capture(make_tasks(tiny_engine, 1, prefix="layers"))
    args.enable_spec_capture = False  # a patched server started without --enable-spec-capture
    with pytest.raises(SchemaMismatchError, match="started with --enable-spec-capture"):
        engine.capture(make_tasks(tiny_engine, 1, prefix="noflag"))


def test_a_failed_server_write_is_retryable_and_quotes_it(
    capture_server, tiny_engine, saved_model_dir
):
    args, open_client = capture_server
    args.bad_capture = "fail"  # the sink's batch put fails: it answers {"error": ...}
    engine = open_client(saved_model_dir)
    with pytest.raises(BackendUnavailableError, match="failed to write: spec-capture batch_put"):
        engine.capture(make_tasks(tiny_engine, 1, prefix="down"))


def test_capture_mooncake_config_rules(tmp_path):
    with pytest.raises(ValueError, match="capture: 'mooncake' needs engine 'sglang'"):
        TargetSection(capture="mooncake")
    TargetSection(engine="sglang", capture="mooncake", server_url="http://x", model_dir="/m")
    with pytest.raises(ValueError, match="needs an online run with a mooncake:// store"):
        LaunchConfig.model_validate(
            {
                "run": {"out_dir": str(tmp_path)},
                "target": {
                    "engine": "sglang",
                    "capture": "mooncake",
                    "server_url": "http://x",
                    "model_dir": "/m",
                },
            }
        )


def test_the_spec_capture_server_refuses_chunked_prefill(tiny_engine):
    with (
        pytest.raises(ValueError, match="--chunked-prefill-size -1"),
        standin_server(
            tiny_engine.model, StandInArgs(enable_spec_capture=True, chunked_prefill_size=8)
        ),
    ):
        pass


def test_the_producer_commits_server_written_features_without_a_put(
    capture_server, tiny_engine, saved_model_dir, mooncake_master, client, monkeypatch
):
    from dataflow.control import open_ledger
    from dataflow.launch.producer import ProducerSettings, RolloutProducer
    from dataflow.store.mooncake import MooncakeFeatureStore

    def no_put(*args, **kwargs):
        raise AssertionError("a server-written sample must not be put")

    monkeypatch.setattr(MooncakeFeatureStore, "put", no_put)
    _, open_client = capture_server
    engine = open_client(saved_model_dir)
    ledger = open_ledger("memory://", max_prompt_attempts=2)
    store = open_store(mooncake_master.uri, client=client)
    tasks = make_tasks(tiny_engine, 3, prefix="prod")
    settings = ProducerSettings(run_id="prod", quantum=2, prompts_per_lease=2)
    producer = RolloutProducer(ledger, store, engine, settings)
    producer.open()
    producer.ingest(tasks)
    report = producer.run()
    assert report.outcome == "closed" and report.committed == 3
    consumer = open_store(mooncake_master.uri, client=client)
    for task, ref in zip(tasks, ledger.refs([t.task_id for t in tasks]), strict=True):
        assert ref.metadata["mooncake_layout"] == "raw" and ref.source_task_id == task.task_id
        got, handle = consumer.get(ref)
        want = tiny_engine.capture([task])[0]
        for name in FEATURE_NAMES:
            assert torch.equal(got[name], want.tensors[name]), name
        consumer.release(handle)
    ledger.close()


def test_a_store_that_cannot_adopt_is_named(capture_server, tiny_engine, saved_model_dir):
    from dataflow.control import open_ledger
    from dataflow.launch.producer import ProducerSettings, RolloutProducer

    _, open_client = capture_server
    engine = open_client(saved_model_dir)
    ledger = open_ledger("memory://", max_prompt_attempts=1)
    store = open_store("memory://")
    settings = ProducerSettings(run_id="mem", quantum=1, prompts_per_lease=1, workers=1)
    producer = RolloutProducer(ledger, store, engine, settings)
    producer.open()
    producer.ingest(make_tasks(tiny_engine, 1, prefix="mem"))
    with pytest.raises(RunFailedError, match="needs a mooncake:// store; MemoryFeatureStore"):
        producer.run()
    assert ledger.status().samples.get("committed", 0) == 0
    ledger.close()
