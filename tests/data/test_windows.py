"""Windows against a naive loop; batches as a pure, complete, process-splittable function of step."""

import numpy as np
import pytest

from jaxgpt.data.windows import (
    WindowDataset,
    batch_indices,
    epoch_of,
    get_batch,
    num_batches,
    sliding_windows,
    split_ids,
)


def naive_windows(ids, max_length, stride):
    """The book's GPTDatasetV1 loop, written out."""
    inputs, targets = [], []
    for i in range(0, len(ids) - max_length, stride):
        inputs.append(ids[i : i + max_length])
        targets.append(ids[i + 1 : i + max_length + 1])
    return inputs, targets


@pytest.mark.parametrize(
    "n, max_length, stride",
    [(37, 4, 1), (37, 4, 4), (37, 4, 5), (37, 7, 3), (37, 36, 1), (38, 36, 2), (5, 4, 9), (101, 13, 13)],
)
def test_windows_match_naive_loop(n, max_length, stride):
    ids = list(np.random.default_rng(n).integers(0, 50257, size=n))
    inputs, targets = sliding_windows(ids, max_length, stride)
    ref_inputs, ref_targets = naive_windows(ids, max_length, stride)
    assert inputs.dtype == targets.dtype == np.int32
    assert inputs.shape == targets.shape == (len(ref_inputs), max_length)
    np.testing.assert_array_equal(inputs, np.array(ref_inputs))
    np.testing.assert_array_equal(targets, np.array(ref_targets))
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])  # targets are inputs shifted by one


def test_windows_are_read_only_and_do_not_alias_caller():
    ids = np.arange(20, dtype=np.int32)
    inputs, _ = sliding_windows(ids, 4, 2)
    with pytest.raises(ValueError):
        inputs[0, 0] = 99
    ids[0] = 99
    assert inputs[0, 0] == 0


def test_window_errors():
    with pytest.raises(ValueError, match="need at least max_length \\+ 1 = 5 tokens .* got 4"):
        sliding_windows([1, 2, 3, 4], 4, 1)
    with pytest.raises(ValueError, match="max_length must be a positive integer, got 0"):
        sliding_windows(range(10), 0, 1)
    with pytest.raises(ValueError, match="stride must be a positive integer, got 1.5"):
        sliding_windows(range(10), 2, 1.5)
    with pytest.raises(ValueError, match="one-dimensional"):
        sliding_windows(np.zeros((2, 10), dtype=int), 2, 1)


@pytest.mark.parametrize("n, ratio", [(100, 0.9), (101, 0.9), (7, 0.5), (10, 0.15)])
def test_split_ids(n, ratio):
    ids = np.arange(n)
    train, val = split_ids(ids, ratio)
    assert len(train) == int(ratio * n)
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)


def test_split_ratio_must_be_a_fraction():
    for ratio in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="train_ratio"):
            split_ids(np.arange(10), ratio)


@pytest.fixture
def windows():
    # 23 windows: odd, so a batch of 4 leaves a remainder of 3.
    return sliding_windows(np.arange(28), max_length=5, stride=1)


def test_num_batches():
    assert num_batches(23, 4) == 5
    assert num_batches(23, 4, drop_last=False) == 6
    assert num_batches(24, 4, drop_last=False) == 6
    assert num_batches(3, 4) == 0


def test_batch_is_pure_function_of_seed_and_step(windows):
    inputs, targets = windows
    a = get_batch(inputs, targets, batch_size=4, step=7, seed=3)
    for _ in range(3):  # steps in any order, interleaved with others
        get_batch(inputs, targets, batch_size=4, step=2, seed=3)
        b = get_batch(inputs, targets, batch_size=4, step=7, seed=3)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    x, y = a
    assert x.shape == y.shape == (4, 5)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    c = get_batch(inputs, targets, batch_size=4, step=7, seed=4)
    assert not np.array_equal(a[0], c[0])


def test_epoch_permutation_is_the_documented_one(windows):
    inputs, targets = windows
    order = np.random.default_rng([3, 1]).permutation(len(inputs))
    # step 6 is the second batch (index 1) of epoch 1 with 5 batches per epoch.
    assert epoch_of(6, len(inputs), 4) == 1
    x, _ = get_batch(inputs, targets, batch_size=4, step=6, seed=3)
    np.testing.assert_array_equal(x, inputs[order[4:8]])


def test_epochs_differ_and_each_window_once_per_epoch(windows):
    inputs, targets = windows
    n = len(inputs)
    per_epoch = num_batches(n, 4, drop_last=False)
    epochs = []
    for epoch in range(3):
        xs = [get_batch(inputs, targets, batch_size=4, step=epoch * per_epoch + i, seed=0, drop_last=False)[0]
              for i in range(per_epoch)]
        assert [len(x) for x in xs] == [4, 4, 4, 4, 4, 3]
        firsts = np.concatenate(xs)[:, 0]  # window i starts with token i
        assert sorted(firsts) == list(range(n))
        epochs.append(firsts)
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])


def test_drop_last_skips_a_remainder_each_epoch(windows):
    inputs, targets = windows
    seen = np.concatenate([get_batch(inputs, targets, batch_size=4, step=s, seed=1)[0][:, 0] for s in range(5)])
    assert len(set(seen)) == 20
    np.testing.assert_array_equal(
        get_batch(inputs, targets, batch_size=4, step=5, seed=1)[0],
        inputs[np.random.default_rng([1, 1]).permutation(23)[:4]],
    )


def test_no_shuffle_is_in_order(windows):
    inputs, targets = windows
    x, y = get_batch(inputs, targets, batch_size=4, step=6, seed=0, shuffle=False)
    np.testing.assert_array_equal(x, inputs[4:8])
    np.testing.assert_array_equal(y, targets[4:8])


@pytest.mark.parametrize("process_count", [1, 2, 3, 6])
def test_process_slices_concatenate_to_global_batch(process_count):
    inputs, targets = sliding_windows(np.arange(70), max_length=3, stride=1)  # 67 windows
    for step in (0, 5, 11, 12, 40):
        gx, gy = get_batch(inputs, targets, batch_size=6, step=step, seed=9)
        parts = [
            get_batch(inputs, targets, batch_size=6, step=step, seed=9, process_index=p, process_count=process_count)
            for p in range(process_count)
        ]
        assert all(len(x) == 6 // process_count for x, _ in parts)
        np.testing.assert_array_equal(np.concatenate([x for x, _ in parts]), gx)
        np.testing.assert_array_equal(np.concatenate([y for _, y in parts]), gy)
        idx = [batch_indices(len(inputs), batch_size=6, step=step, seed=9, process_index=p,
                             process_count=process_count) for p in range(process_count)]
        assert len(set(np.concatenate(idx))) == 6  # disjoint


def test_process_errors(windows):
    inputs, targets = windows
    with pytest.raises(ValueError, match="batch_size=4 must be divisible by process_count=3"):
        get_batch(inputs, targets, batch_size=4, step=0, seed=0, process_count=3)
    with pytest.raises(ValueError, match="process_index must be in \\[0, 2\\)"):
        get_batch(inputs, targets, batch_size=4, step=0, seed=0, process_index=2, process_count=2)
    # 23 % 4 = 3 windows in the last batch cannot be split over 2 processes; fail at step 0.
    with pytest.raises(ValueError, match="last batch .* 3 windows"):
        get_batch(inputs, targets, batch_size=4, step=0, seed=0, drop_last=False, process_count=2)


def test_batch_errors(windows):
    inputs, targets = windows
    with pytest.raises(ValueError, match="23 windows make no batch of batch_size=24"):
        get_batch(inputs, targets, batch_size=24, step=0, seed=0)
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        get_batch(inputs, targets, batch_size=4, step=-1, seed=0)
    with pytest.raises(ValueError, match="both be \\[N, T\\],"):
        get_batch(inputs, targets[:, :-1], batch_size=4, step=0, seed=0)


def test_window_dataset(windows):
    ds = WindowDataset.from_ids(np.arange(28), max_length=5, stride=1)
    assert len(ds) == 23
    assert ds.num_batches(4) == 5
    x, y = ds.batch(3, batch_size=4, seed=2, process_index=1, process_count=2)
    ref = get_batch(*windows, batch_size=4, step=3, seed=2, process_index=1, process_count=2)
    np.testing.assert_array_equal(x, ref[0])
    np.testing.assert_array_equal(y, ref[1])
    with pytest.raises(ValueError, match="both be \\[N, T\\],"):
        WindowDataset(np.zeros((3, 4)), np.zeros((3, 5)))
