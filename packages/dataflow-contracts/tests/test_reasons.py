"""clip_reason: any text becomes a reason the ledger accepts, and short printable text is kept."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dataflow.contracts.states import MAX_REASON_LENGTH, clip_reason


def test_short_printable_reason_is_unchanged() -> None:
    assert clip_reason("producer stopped: SIGTERM") == "producer stopped: SIGTERM"


def test_long_reason_is_cut_to_the_limit_and_marked() -> None:
    reason = clip_reason("x" * (MAX_REASON_LENGTH + 63))
    assert len(reason) == MAX_REASON_LENGTH
    assert reason.endswith("…")
    assert reason.startswith("x" * (MAX_REASON_LENGTH - 1))


def test_control_characters_become_spaces() -> None:
    assert clip_reason("line one\nline two\ttab") == "line one line two tab"


@given(st.text(max_size=2 * MAX_REASON_LENGTH))
def test_every_clipped_reason_fits_and_is_printable(text: str) -> None:
    reason = clip_reason(text)
    assert len(reason) <= MAX_REASON_LENGTH
    assert reason.isprintable()
