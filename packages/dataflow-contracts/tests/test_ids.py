import pytest

from dataflow.contracts import InvalidInputError
from dataflow.contracts.ids import MAX_ID_LENGTH, validate_id, validate_sample_id, validate_task_id


@pytest.mark.parametrize(
    "value",
    ["s1", "run-3:epoch=0:task_17", "a.b", "A_b+c@d=e", "x" * MAX_ID_LENGTH, "0"],
)
def test_safe_ids_pass(value):
    assert validate_sample_id(value) == value
    assert validate_task_id(value) == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "must not be empty"),
        ("..", "must not start with '.'"),
        ("a/../b", "forbidden character '/'"),
        ("../etc", "forbidden character '/'"),
        ("a..b", "must not contain '..'"),
        ("a/b", "forbidden character '/'"),
        ("a\\b", r"forbidden character '\\'"),
        ("a\x00b", r"forbidden character '\x00'"),
        ("a\nb", r"forbidden character '\n'"),
        ("a\x1bb", r"forbidden character '\x1b'"),
        ("a b", "forbidden character ' '"),
        ("é", "forbidden character 'é'"),
        (".hidden", "must not start with '.'"),
        ("-rf", "must not start with '-'"),
        ("x" * (MAX_ID_LENGTH + 1), f"the limit is {MAX_ID_LENGTH}"),
    ],
)
def test_unsafe_ids_refused(value, message):
    with pytest.raises(InvalidInputError) as info:
        validate_sample_id(value)
    assert "sample id" in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize("value", [None, 3, b"abc", ["a"]])
def test_non_str_refused(value):
    with pytest.raises(InvalidInputError, match="task id must be a str"):
        validate_task_id(value)


def test_kind_is_named():
    with pytest.raises(InvalidInputError, match="^weight version id must not be empty$"):
        validate_id("", "weight version id")
