"""DraftVersions: the producer's draft stamp waits for the first publish, says why, and fails
fast (naming the setting) when no version can come.
"""

from __future__ import annotations

import threading
import time

import pytest

from dataflow.contracts import ConsumerState, RunFailedError, WeightVersion
from dataflow.control import open_ledger
from dataflow.launch.producer.versions import DraftVersions


@pytest.fixture
def ledger():
    ledger = open_ledger("memory://")
    ledger.open_run("run-v", 2, resume=False)
    yield ledger
    ledger.close()


def test_not_required_returns_none_at_once_then_the_newest(ledger):
    versions = DraftVersions(ledger, required=False)
    assert versions() is None
    ledger.publish_weight(WeightVersion("run-v-step0", 0))
    ledger.publish_weight(WeightVersion("run-v-step2", 2))
    assert versions() == "run-v-step2"


def test_required_waits_for_the_first_publish(ledger):
    versions = DraftVersions(ledger, required=True, poll_s=0.01)
    timer = threading.Timer(0.3, ledger.publish_weight, args=(WeightVersion("run-v-step0", 0),))
    timer.start()
    started = time.monotonic()
    assert versions() == "run-v-step0"
    assert time.monotonic() - started >= 0.25 and versions.waited_s > 0


def test_required_fails_fast_when_the_consumer_ended_without_publishing(ledger):
    ledger.set_consumer_state(ConsumerState.RUNNING)
    ledger.set_consumer_state(ConsumerState.DONE)
    with pytest.raises(RunFailedError, match="staleness.enabled: the consumer is done"):
        DraftVersions(ledger, required=True, poll_s=0.01)()
    assert ledger.weight_versions() == []


def test_required_fails_after_the_timeout_naming_the_setting(ledger, caplog):
    versions = DraftVersions(ledger, required=True, timeout_s=0.3, poll_s=0.01, log_every_s=0.1)
    with pytest.raises(RunFailedError, match=r"within 0.3s \(staleness.first_version_timeout_s\)"):
        versions()
    assert "waiting" in caplog.text and "staleness.enabled" in caplog.text


def test_stop_ends_the_wait(ledger):
    versions = DraftVersions(ledger, required=True, poll_s=0.01)
    threading.Timer(0.1, versions.stop).start()
    assert versions() is None
