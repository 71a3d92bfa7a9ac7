from __future__ import annotations

import pytest

from dataflow.contracts import InvalidInputError
from dataflow.launch.config import load_config
from dataflow.launch.producer import (
    ProducerSettings,
    admission_factory,
    flow_limits,
    ledger_options,
    open_config_ledger,
    store_options,
)


def test_settings_follow_the_config():
    config = load_config(
        None,
        [
            "run.id=r7",
            "producer.workers=3",
            "target.batch_size=5",
            "trainer.batch_size=2",
            "trainer.accumulation_steps=2",
            "flow.high_watermark=8",
            "flow.low_watermark=4",
        ],
    )
    settings = ProducerSettings.from_config(config, "pool-a")
    assert (settings.run_id, settings.quantum, settings.prompts_per_lease) == ("r7", 4, 5)
    assert settings.worker_names == ("pool-a-w0", "pool-a-w1", "pool-a-w2")
    assert settings.max_failed_prompts == 0


def test_flow_limits_and_backend_options(tmp_path):
    config = load_config(
        None,
        [
            "flow.high_bytes=1000",
            "flow.low_bytes=500",
            "flow.byte_cap=2000",
            "store.options.budget_bytes=4096",
            f"ledger.uri=sqlite://{tmp_path}/l.db",
            "ledger.options.timeout_s=3",
            "producer.max_attempts=5",
        ],
    )
    limits = flow_limits(config)
    assert (limits.high_refs, limits.low_refs) == (64, 48)
    assert (limits.high_bytes, limits.low_bytes, limits.max_bytes) == (1000, 500, 2000)
    assert store_options(config) == {"budget_bytes": 4096}
    assert ledger_options(config) == {"max_prompt_attempts": 5, "busy_timeout_s": 3.0}
    ledger = open_config_ledger(config)
    assert ledger.durable and ledger.uri.startswith("sqlite://")
    ledger.close()
    redis = load_config(None, ["ledger.uri=redis://127.0.0.1:1/0"])
    assert ledger_options(redis)["connect_timeout_s"] == 10.0


def test_token_only_for_dir_stores():
    config = load_config(None, ["store.options.token=abc"])
    with pytest.raises(InvalidInputError, match="only dir:// stores take a token"):
        store_options(config)
    shared = load_config(
        None,
        ["store.options.token=abc", "store.uri=dir:///tmp/x", "run.topology=disaggregated_offline"],
    )
    assert store_options(shared) == {"token": "abc"}


def test_admission_only_when_staleness_is_enabled():
    assert admission_factory(load_config(), "t") is None
    enabled = load_config(None, ["staleness.enabled=true"])
    assert callable(admission_factory(enabled, "t"))
    no_admission = load_config(None, ["staleness.enabled=true", "staleness.admission=false"])
    assert admission_factory(no_admission, "t") is None


def test_settings_refuse_bad_values():
    with pytest.raises(InvalidInputError, match="workers must be an int >= 1"):
        ProducerSettings(run_id="r", quantum=1, workers=0)
    with pytest.raises(InvalidInputError, match="lease_s must be > 0"):
        ProducerSettings(run_id="r", quantum=1, lease_s=0)
    with pytest.raises(InvalidInputError, match="producer id"):
        ProducerSettings(run_id="r", quantum=1, producer_id="a/b")
