"""The batch-buffer reuse rule: a buffer is reused only once nothing references it any more."""

import pytest
import torch
from train_support import put_samples

from dataflow.store import open_store
from dataflow.train.batch_buffers import POOL_MIN_BYTES, BatchBuffers
from dataflow.train.collate import collate
from dataflow.train.loader import FeatureDataLoader


def _ptr(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_a_buffer_is_reused_only_after_every_reference_to_it_is_gone():
    pool = BatchBuffers(4)
    first = pool.take((2, 3), torch.float32)
    ptr = _ptr(first)
    view = first[1:]
    del first
    held = pool.take((2, 3), torch.float32)  # the view still holds the first buffer
    assert _ptr(held) != ptr and pool.reused == 0
    del view
    again = pool.take((3,), torch.float32)  # idle now, and big enough
    assert _ptr(again) == ptr and pool.reused == 1
    assert pool.take((2, 3), torch.int64).dtype == torch.int64  # both kept ones are held
    assert pool.kept == 3


def test_a_tensor_autograd_saved_is_not_reused_before_its_backward_ran():
    pool = BatchBuffers(4)
    batch = pool.take((4, 4), torch.float32)
    batch.copy_(torch.full((4, 4), 2.0))
    ptr = _ptr(batch)
    weight = torch.ones(4, 4, requires_grad=True)
    loss = (batch @ weight).sum()  # matmul saves ``batch`` for the weight's gradient
    del batch
    other = pool.take((4, 4), torch.float32)
    other_ptr = _ptr(other)
    assert other_ptr != ptr and pool.reused == 0
    other.fill_(99.0)
    loss.backward()  # frees the saved tensor; the gradient used the untouched values
    assert torch.equal(weight.grad, torch.full((4, 4), 8.0))
    del loss, other
    assert _ptr(pool.take((4, 4), torch.float32)) in {ptr, other_ptr}
    assert pool.reused == 1


def test_the_pool_keeps_at_most_its_bound_and_hands_out_unkept_buffers_past_it():
    pool = BatchBuffers(2)
    held = [pool.take((8,), torch.float32) for _ in range(5)]
    assert pool.kept == 2 and len({_ptr(t) for t in held}) == 5
    del held
    bigger = pool.take((16,), torch.float32)  # both kept are idle but too small: one is evicted
    assert pool.kept == 2 and bigger.shape == (16,)
    pool.clear()
    assert pool.kept == 0
    with pytest.raises(ValueError, match="max_buffers"):
        BatchBuffers(-1)


def test_collation_pools_only_batch_tensors_past_the_mmap_threshold():
    pool = BatchBuffers(4)
    small = {"input_ids": torch.zeros(1, 8, dtype=torch.int64), "hidden_state": torch.ones(1, 8, 4)}
    collate(["a"], [small], strategy="eagle3", buffers=pool)
    assert pool.kept == 0  # the allocator serves small tensors without page faults
    width = POOL_MIN_BYTES // (2 * 8 * 4)  # two rows of this width reach the threshold
    big = {
        "input_ids": torch.zeros(1, 8, dtype=torch.int64),
        "hidden_state": torch.ones(1, 8, width),
    }
    one = collate(["a"], [big], strategy="eagle3", buffers=pool)
    assert pool.kept == 0  # one row is half the threshold
    two = collate(["a", "b"], [big, big], strategy="eagle3", buffers=pool)
    assert pool.kept == 1  # only hidden_state: input_ids stays small
    assert torch.equal(two.tensors["hidden_state"][1], big["hidden_state"][0])
    assert torch.equal(one.tensors["hidden_state"], big["hidden_state"])
    del two
    again = collate(["a", "b"], [big, big], strategy="eagle3", buffers=pool)
    assert pool.reused == 1 and torch.equal(again.tensors["input_ids"], torch.zeros(2, 8))


def test_pooled_collation_gives_the_same_batches_and_never_overwrites_a_held_one():
    width = POOL_MIN_BYTES // (2 * 2 * 4) + 1  # even two rows of two tokens are pooled

    def sample(length: int, value: float) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.full((1, length), int(value), dtype=torch.int64),
            "hidden_state": torch.full((1, length, width), value),
        }

    pool = BatchBuffers(8)
    kept = []
    for i, lengths in enumerate([(4, 4), (3, 5), (4, 4), (2, 2)]):
        samples = [sample(n, float(i * 2 + j)) for j, n in enumerate(lengths)]
        pooled = collate(["a", "b"], samples, strategy="eagle3", buffers=pool)
        plain = collate(["a", "b"], samples, strategy="eagle3")
        for name, tensor in plain.tensors.items():
            assert torch.equal(pooled.tensors[name], tensor), name
        kept.append((pooled, plain))
    assert pool.kept == 4
    for pooled, plain in kept:  # every batch still held keeps its own values
        for name, tensor in plain.tensors.items():
            assert torch.equal(pooled.tensors[name], tensor), name


@pytest.mark.parametrize("prefetch", [0, 1])
def test_the_loader_reuses_buffers_of_dropped_batches_and_keeps_held_ones_intact(prefetch):
    store = open_store("memory://buffers", retain_on_release=True)
    refs = put_samples(store, 8, lengths=512)  # aux_hidden_state [2, 512, 48] f32: pooled
    expected = list(
        FeatureDataLoader(store, refs=refs, batch_size=2, shuffle=False, reuse_buffers=False)
    )
    loader = FeatureDataLoader(store, refs=refs, batch_size=2, shuffle=False, prefetch=prefetch)
    held = list(loader)  # every batch held at once: none may share memory with another
    for got, want in zip(held, expected, strict=True):
        assert got.sample_ids == want.sample_ids
        for name, tensor in want.tensors.items():
            assert torch.equal(got.tensors[name], tensor), name
    pointers = set()
    streamed = FeatureDataLoader(store, refs=refs, batch_size=2, shuffle=False, prefetch=prefetch)
    for got, want in zip(streamed, expected, strict=True):  # each batch dropped at the next
        for name, tensor in want.tensors.items():
            assert torch.equal(got.tensors[name], tensor), name
        pointers.add(_ptr(got.tensors["aux_hidden_state"]))
    assert streamed._buffers is not None and streamed._buffers.reused > 0
    assert len(pointers) < len(expected)
    streamed.close()
    assert streamed._buffers.kept == 0
    store.close()
