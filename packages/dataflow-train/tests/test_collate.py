import pytest
import torch

from dataflow.contracts import SchemaMismatchError
from dataflow.train.collate import collate, padded_length


def _sample(length: int, hidden: int = 4) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.arange(1, length + 1).unsqueeze(0),
        "hidden_state": torch.ones(1, length, hidden),
    }


def test_pads_to_longest_and_marks_real_tokens():
    batch = collate(["a", "b"], [_sample(3), _sample(5)], strategy="eagle3")
    assert batch.sample_ids == ("a", "b")
    assert batch.tensors["input_ids"].tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]]
    assert batch.tensors["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.tensors["attention_mask"].dtype == torch.int64
    assert batch.tensors["hidden_state"].shape == (2, 5, 4)
    assert batch.tensors["hidden_state"][0, 3:].abs().sum() == 0
    assert batch.metadata["sequence_lengths"] == (3, 5)


def test_pads_to_a_multiple_of_the_sequence_parallel_degree():
    batch = collate(["a", "b"], [_sample(3), _sample(5)], strategy="eagle3", pad_multiple=4)
    assert batch.tensors["input_ids"].shape == (2, 8)
    assert batch.tensors["attention_mask"].sum().item() == 8
    assert padded_length(8, 4) == 8 and padded_length(9, 4) == 12


def test_equal_lengths_are_copied_into_fresh_batch_tensors():
    samples = [_sample(4), _sample(4)]
    batch = collate(["a", "b"], samples, strategy="eagle3")
    assert batch.tensors["input_ids"].tolist() == [[1, 2, 3, 4]] * 2
    assert batch.tensors["attention_mask"].tolist() == [[1, 1, 1, 1]] * 2
    assert batch.tensors["attention_mask"].dtype == torch.int64
    single = collate(["a"], samples[:1], strategy="eagle3")
    for out in (batch, single):  # a copy: the store's buffers may be freed right after
        for name, tensor in samples[0].items():
            assert out.tensors[name].untyped_storage().data_ptr() != (
                tensor.untyped_storage().data_ptr()
            )


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"input_ids": torch.ones(1, 3, dtype=torch.int64)}, "carry different features"),
        (
            {"input_ids": torch.ones(1, 3, dtype=torch.int32), "hidden_state": torch.ones(1, 3, 4)},
            "torch.int64 rank 2",
        ),
        (
            {"input_ids": torch.ones(1, 3, dtype=torch.int64), "hidden_state": torch.ones(1, 3, 5)},
            "trailing shape",
        ),
        (
            {"input_ids": torch.ones(3, dtype=torch.int64), "hidden_state": torch.ones(3, 4)},
            "[1, T",
        ),
        (
            {"input_ids": torch.ones(1, 3, dtype=torch.int64), "hidden_state": torch.ones(1, 4, 4)},
            "disagree on the sequence length",
        ),
        (
            {**_sample(3), "attention_mask": torch.ones(1, 3, dtype=torch.int64)},
            "which collation owns",
        ),
    ],
)
def test_refuses_samples_that_do_not_fit_one_batch(second, message):
    first = _sample(3)
    with pytest.raises(SchemaMismatchError, match=message.replace("[", r"\[")):
        collate(["a", "b"], [first, second], strategy="eagle3")
