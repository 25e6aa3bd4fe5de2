import numpy as np
import pytest

from jaxdist.data import ArrayBatches, eval_batches, prefetch_to_devices
from jaxdist.errors import UserError


def arrays(n):
    return {"x": np.arange(n * 2, dtype=np.float32).reshape(n, 2), "id": np.arange(n)}


def test_each_epoch_serves_every_example_once_in_a_seeded_order():
    batches = ArrayBatches(arrays(40), batch_size=8, num_devices=4, seed=1)
    epoch0 = np.concatenate([next(batches)["id"] for _ in range(5)])
    epoch1 = np.concatenate([next(batches)["id"] for _ in range(5)])
    assert sorted(epoch0) == list(range(40)) and sorted(epoch1) == list(range(40))
    assert not np.array_equal(epoch0, epoch1)
    again = ArrayBatches(arrays(40), batch_size=8, num_devices=4, seed=1)
    np.testing.assert_array_equal(np.concatenate([next(again)["id"] for _ in range(5)]), epoch0)


def test_the_incomplete_last_batch_of_an_epoch_is_dropped():
    batches = ArrayBatches(arrays(20), batch_size=8, num_devices=8, seed=0)
    first_epoch = [next(batches)["id"] for _ in range(2)]
    assert batches.state() == {"epoch": 0, "index": 16}
    next(batches)
    assert batches.state() == {"epoch": 1, "index": 8}
    assert len(set(np.concatenate(first_epoch))) == 16


def test_restore_continues_with_the_same_batches():
    reference = ArrayBatches(arrays(30), batch_size=6, num_devices=2, seed=5)
    for _ in range(7):
        next(reference)
    position = reference.state()
    expected = [next(reference) for _ in range(9)]
    resumed = ArrayBatches(arrays(30), batch_size=6, num_devices=2, seed=5)
    resumed.restore(position)
    for want in expected:
        got = next(resumed)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_full_batch_is_padded_with_zero_weights_and_reused():
    batches = ArrayBatches(arrays(10), batch_size=0, num_devices=4)
    batch = next(batches)
    assert batch["x"].shape == (12, 2)
    np.testing.assert_array_equal(batch["weight"], [1] * 10 + [0] * 2)
    np.testing.assert_array_equal(batch["x"][10:], 0)
    assert next(batches) is batch


def test_eval_batches_cover_every_row_once_with_padding():
    batches = list(eval_batches(arrays(11), batch_size=4, num_devices=4))
    ids = np.concatenate([b["id"][b["weight"] == 1] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(11))
    assert [int(b["weight"].sum()) for b in batches] == [4, 4, 3]


@pytest.mark.parametrize("data,batch_size,fragment", [
    ({"x": np.zeros(3), "y": np.zeros(4)}, 2, "differ in length"),
    ({"x": np.zeros(0)}, 0, "empty"),
    ({}, 0, "no arrays"),
    (arrays(10), 6, "cannot be split over 4 devices"),
    (arrays(10), 12, "larger than the 10 training examples"),
])
def test_bad_data_is_refused(data, batch_size, fragment):
    with pytest.raises(UserError, match=fragment):
        ArrayBatches(data, batch_size=batch_size, num_devices=4)


def test_prefetch_puts_each_batch_once_and_keeps_order():
    put_calls = []

    def put(batch):
        put_calls.append(batch)
        return ("on device", batch)

    shared = {"a": 1}
    source = [{"a": 0}, shared, shared, {"a": 2}]
    out = list(prefetch_to_devices(source, put, size=2))
    assert [b[1] for b in out] == source
    assert len(put_calls) == 3
