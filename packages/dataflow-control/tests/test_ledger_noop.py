"""The no-op ledger's own contract: it validates like the others, retains nothing, says so."""

from __future__ import annotations

import pytest
from ledger_conformance import FakeTensor, make_ref, make_refs, make_task

from dataflow.contracts import (
    ClosedError,
    InvalidInputError,
    Ledger,
    NotFoundError,
    ProducerState,
    PromptState,
    WeightVersion,
)
from dataflow.control.ledger import NoopLedger, open_ledger


@pytest.fixture
def ledger() -> Ledger:
    return open_ledger("noop://")


def test_is_a_ledger_that_reports_it_retains_nothing(ledger: Ledger) -> None:
    assert isinstance(ledger, NoopLedger) and isinstance(ledger, Ledger)
    assert ledger.durable is False
    status = ledger.status()
    assert (status.backend, status.durable) == ("noop", False)


def test_commits_are_all_fresh_and_nothing_is_retained(ledger: Ledger) -> None:
    ledger.open_run("run-1", 4, resume=False)
    assert ledger.commit(make_refs(0, 4)).committed == ("s00000", "s00001", "s00002", "s00003")
    assert ledger.commit(make_refs(0, 1)).duplicates == ()  # nothing to deduplicate against
    assert ledger.assign_window(2, 2) is None
    assert ledger.assigned(0) == []
    with pytest.raises(NotFoundError, match="retains nothing"):
        ledger.refs(["s00000"])
    status = ledger.status()
    assert sum(status.samples.values()) == 0 and status.in_flight == 0
    assert ledger.markers().run_id == ""
    ledger.open_run("run-1", 4, resume=False)  # still empty: a fresh run is fine again


def test_prompts_and_weights_are_not_retained(ledger: Ledger) -> None:
    assert ledger.add_prompts([make_task(0)]).committed == ("t00000",)
    assert ledger.lease_prompts("w1", 5, 1.0) == []
    assert ledger.complete_prompt("t00000", "w1") is PromptState.DONE
    published = ledger.publish_weight(WeightVersion("draft-1", step=1))
    assert published.publish_order == 0 and ledger.weight_versions() == []


def test_bad_input_is_refused_like_a_real_ledger(ledger: Ledger) -> None:
    bad = make_ref(1)
    object.__setattr__(bad, "metadata", {"x": [FakeTensor()]})
    with pytest.raises(TypeError, match=r"refs\[0\]\.metadata\['x'\]\[0\]"):
        ledger.commit([bad])
    with pytest.raises(InvalidInputError, match="step"):
        ledger.ack(-1, [])
    with pytest.raises(InvalidInputError, match="needs|reason"):
        ledger.drop(["s1"], "")
    with pytest.raises(InvalidInputError, match="ProducerState"):
        ledger.set_producer_state("nope")  # type: ignore[arg-type]
    ledger.set_producer_state(ProducerState.RUNNING)


def test_noop_takes_no_options_and_closes() -> None:
    with pytest.raises(InvalidInputError, match="unknown option"):
        open_ledger("noop://", max_prompt_attempts=2)
    ledger = open_ledger("noop://")
    ledger.close()
    with pytest.raises(ClosedError):
        ledger.status()
