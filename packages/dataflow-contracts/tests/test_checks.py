"""The one integer (and number) check every plane uses: a ``bool`` is never an ``int``."""

from __future__ import annotations

import pytest

from dataflow.contracts.checks import is_int, is_number


@pytest.mark.parametrize(
    ("value", "integer", "number"),
    [
        (0, True, True),
        (-3, True, True),
        (2**70, True, True),
        (1.0, False, True),
        (float("nan"), False, True),
        (True, False, False),
        (False, False, False),
        ("1", False, False),
        (None, False, False),
    ],
)
def test_bool_is_neither_an_int_nor_a_number(value, integer, number):
    assert is_int(value) is integer
    assert is_number(value) is number
