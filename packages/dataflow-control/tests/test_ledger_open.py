"""``open_ledger``: one entry point, clear errors for bad URIs and options."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dataflow.contracts import BackendUnavailableError, InvalidInputError
from dataflow.control import open_ledger


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("postgres://db/ledger", "unknown ledger scheme 'postgres'"),
        ("sqlite://", "needs a path"),
        ("ledger.db", "has no scheme"),
        ("redis://127.0.0.1:6379/zero", "database must be a number"),
        ("memory://a/b", "must not contain '/'"),
    ],
)
def test_bad_uris_are_refused(uri: str, problem: str) -> None:
    with pytest.raises(InvalidInputError, match=problem):
        open_ledger(uri)


def test_options_from_uri_and_keywords(tmp_path: Path) -> None:
    uri = f"sqlite://{tmp_path}/l.db?max_prompt_attempts=2"
    with pytest.raises(InvalidInputError, match="given both in the URI and as a keyword"):
        open_ledger(uri, max_prompt_attempts=3)
    with pytest.raises(InvalidInputError, match="unknown option 'colour' for memory://"):
        open_ledger("memory://", colour="red")
    with pytest.raises(InvalidInputError, match="max_prompt_attempts must be an int >= 1"):
        open_ledger("memory://", max_prompt_attempts=0)
    assert not (tmp_path / "l.db").exists()  # refused before anything was created


def test_redis_without_its_client_library_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # as if the `redis` extra were missing
    with pytest.raises(BackendUnavailableError, match=r"pip install 'dataflow-control\[redis\]'"):
        open_ledger("redis://127.0.0.1:6379/0")
