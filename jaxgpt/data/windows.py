"""Next-token windows and deterministic, step-indexed batches (pure numpy).

A batch is a pure function of (seed, step): epoch `e = step // batches_per_epoch` visits the
windows in the order `np.random.default_rng([seed, e]).permutation(N)`, and the step picks its
slice of that order. Resuming a run therefore needs only the step number, no iterator state.
With several processes, each takes a contiguous slice of the same global batch.
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass

import numpy as np

from jaxgpt.checks import check_non_negative_int, check_positive_int

# A target the loss skips (padding, a masked prompt), as in PyTorch's cross_entropy.
IGNORE = -100


def sliding_windows(token_ids, max_length: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets [N, max_length] int32, windows starting every `stride`."""
    check_positive_int("max_length", max_length)
    check_positive_int("stride", stride)
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be one-dimensional, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token_ids must be integers, got dtype {ids.dtype}")
    if len(ids) < max_length + 1:
        raise ValueError(
            f"need at least max_length + 1 = {max_length + 1} tokens for one window and its target, "
            f"got {len(ids)}"
        )
    # One private int32 copy of the ids; the windows are read-only strided views into it, so
    # memory stays 4 bytes per token whatever the stride. Window i is ids[i*stride :][: L + 1].
    ids = np.array(ids, dtype=np.int32, copy=True)
    spans = np.lib.stride_tricks.sliding_window_view(ids, max_length + 1)[::stride]  # [N, L+1]
    return spans[:, :-1], spans[:, 1:]  # [N, L] each, targets shifted by one


def split_ids(token_ids, train_ratio: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """The first `train_ratio` of the tokens for training, the rest for validation."""
    # The book splits the text by characters and tokenizes each part; splitting the ids avoids
    # tokenizing twice and cutting a word into two odd tokens at the boundary.
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be strictly between 0 and 1, got {train_ratio!r}")
    ids = np.asarray(token_ids)
    cut = int(train_ratio * len(ids))
    return ids[:cut], ids[cut:]


def num_batches(n_windows: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches per epoch: full batches only, or with a final smaller one."""
    check_non_negative_int("n_windows", n_windows)
    check_positive_int("batch_size", batch_size)
    return n_windows // batch_size if drop_last else -(-n_windows // batch_size)


def _batches_per_epoch(n_windows: int, batch_size: int, drop_last: bool) -> int:
    n = num_batches(n_windows, batch_size, drop_last)
    if n == 0:
        raise ValueError(
            f"{n_windows} windows make no batch of batch_size={batch_size}; "
            "use more data, a smaller batch_size, or drop_last=False"
        )
    return n


def epoch_of(step: int, n_windows: int, batch_size: int, drop_last: bool = True) -> int:
    """The epoch that global step `step` falls in."""
    check_non_negative_int("step", step)
    return step // _batches_per_epoch(n_windows, batch_size, drop_last)


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    # Cached because consecutive steps share an epoch; read-only since callers share it.
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False
    return order


def batch_indices(
    n_windows: int,
    *,
    batch_size: int,
    step: int,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = True,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """Window indices of this process's part of the batch at global step `step`."""
    check_non_negative_int("step", step)
    check_non_negative_int("seed", seed)
    check_positive_int("process_count", process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be divisible by process_count={process_count}")
    per_epoch = _batches_per_epoch(n_windows, batch_size, drop_last)
    last = n_windows % batch_size
    if not drop_last and process_count > 1 and last % process_count:
        # Checked for every step, so a bad setting fails at step 0, not at the end of an epoch.
        raise ValueError(
            f"the last batch of each epoch has {last} windows, not divisible by "
            f"process_count={process_count}; use drop_last=True"
        )
    epoch, index = divmod(step, per_epoch)
    start = index * batch_size
    order = _permutation(int(seed), int(epoch), n_windows) if shuffle else np.arange(n_windows)
    order = order[start : min(start + batch_size, n_windows)]
    local = len(order) // process_count
    return order[process_index * local : (process_index + 1) * local]


def get_batch(
    inputs: np.ndarray,
    targets: np.ndarray,
    *,
    batch_size: int,
    step: int,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = True,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """This process's (x, y) at global step `step`: a pure function of (seed, step)."""
    if inputs.shape != targets.shape or inputs.ndim != 2:
        raise ValueError(f"inputs and targets must both be [N, T], got {inputs.shape} and {targets.shape}")
    idx = batch_indices(
        len(inputs),
        batch_size=batch_size,
        step=step,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        process_index=process_index,
        process_count=process_count,
    )
    return inputs[idx], targets[idx]  # [B / process_count, T] each, fresh contiguous copies


class Windows(abc.ABC):
    """The dataset interface the trainer reads: `len(ds)` windows and `ds.rows(indices)`.

    Subclasses hold the windows in memory (WindowDataset) or read them from token shards on
    disk (jaxgpt.data.shards.ShardDataset); batching by step is shared, so both give the same batch
    for the same (seed, step) over the same token stream."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The windows at `indices` as the trainer's batch dict ("inputs", "targets")."""

    def num_batches(self, batch_size: int, drop_last: bool = True) -> int:
        """Batches per epoch."""
        return num_batches(len(self), batch_size, drop_last)

    def batch(self, step: int, batch_size: int, seed: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        """This process's (x, y) at global step `step`; keyword options as in `batch_indices`."""
        idx = batch_indices(len(self), batch_size=batch_size, step=step, seed=seed, **kwargs)
        rows = self.rows(idx)
        return rows["inputs"], rows["targets"]


@dataclass(frozen=True)
class WindowDataset(Windows):
    """Next-token windows of one token stream held in memory, batched by step."""

    inputs: np.ndarray  # [N, T]
    targets: np.ndarray  # [N, T]

    def __post_init__(self):
        if self.inputs.shape != self.targets.shape or self.inputs.ndim != 2:
            raise ValueError(
                f"inputs and targets must both be [N, T], got {self.inputs.shape} and {self.targets.shape}"
            )

    @classmethod
    def from_ids(cls, token_ids, max_length: int, stride: int) -> "WindowDataset":
        """Windows of `token_ids` as built by `sliding_windows`."""
        return cls(*sliding_windows(token_ids, max_length, stride))

    def __len__(self) -> int:
        return len(self.inputs)

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The windows at `indices` as the trainer's batch dict."""
        return {"inputs": self.inputs[indices], "targets": self.targets[indices]}
