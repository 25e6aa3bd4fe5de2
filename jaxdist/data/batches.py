"""Global batches from in-memory arrays, with a `weight` per example (0 for padding).

Every batch is a dict of numpy arrays with the same leading size, plus `weight` (float32):
1 for a real example, 0 for a padding row. The core's exact weighting makes padding harmless,
so no example is ever dropped from a full batch or an evaluation pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from jaxdist.errors import UserError
from jaxdist.parallel import check_batch_split

Arrays = Mapping[str, np.ndarray]
WEIGHT = "weight"


def validate_arrays(arrays: Arrays, what: str = "data") -> int:
    """Check that `arrays` is a non-empty dict of equal-length arrays; return that length."""
    if not arrays:
        raise UserError(f"{what} has no arrays; give a dict such as {{'x': ..., 'y': ...}}")
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise UserError(f"{what} arrays differ in length ({lengths}); every array needs one "
                        f"row per example")
    n = next(iter(lengths.values()))
    if n == 0:
        raise UserError(f"{what} is empty; it needs at least one example")
    if WEIGHT in arrays:
        raise UserError(f"{what} may not contain a '{WEIGHT}' array; jaxdist adds it")
    return n


def pad_batch(arrays: Arrays, rows: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Gather `rows` of every array and pad with zero rows (weight 0) up to `size` rows."""
    count = len(rows)
    batch = {}
    for name, a in arrays.items():
        out = np.zeros((size, *a.shape[1:]), a.dtype)
        out[:count] = a[rows]
        batch[name] = out
    weight = np.zeros(size, np.float32)
    weight[:count] = 1.0
    batch[WEIGHT] = weight
    return batch


def padded_size(count: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that holds `count` rows."""
    return -(-count // multiple) * multiple


class ArrayBatches:
    """An endless iterator of training batches drawn from in-memory arrays.

    - `batch_size=0` (full batch): every batch is the whole set in its stored order, padded
      to a multiple of `num_devices`. The same dict object is returned each time, so it is
      placed on the devices once.
    - otherwise: each epoch is a permutation that depends only on `(seed, epoch)`, cut into
      batches of `batch_size`; the incomplete last batch of an epoch is dropped.

    The position is `state()` = `{"epoch": e, "index": i}`; `restore(state)` continues with
    exactly the batches an uninterrupted iterator would have produced.
    """

    def __init__(self, arrays: Arrays, batch_size: int, num_devices: int, seed: int = 0):
        self.arrays = {name: np.asarray(a) for name, a in arrays.items()}
        self.size = validate_arrays(self.arrays, "training data")
        self.seed = seed
        self.full = batch_size == 0
        if self.full:
            self.batch_size = padded_size(self.size, num_devices)
            self._full_batch = pad_batch(self.arrays, np.arange(self.size), self.batch_size)
        else:
            check_batch_split(batch_size, num_devices)
            if batch_size > self.size:
                raise UserError(f"train.batch_size={batch_size} is larger than the "
                                f"{self.size} training examples; use train.batch_size=full")
            self.batch_size = batch_size
        self.epoch = 0
        self.index = 0
        self._cached_order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of example indices for `epoch`, a pure function of (seed, epoch)."""
        if self._cached_order is None or self._cached_order[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._cached_order = (epoch, perm)
        return self._cached_order[1]

    def state(self) -> dict[str, int]:
        """The position: the epoch and the index of the next example within it."""
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a position returned by `state()`."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.full:
            self.epoch += 1
            return self._full_batch
        if self.index + self.batch_size > self.size:
            self.epoch, self.index = self.epoch + 1, 0
        rows = self.order(self.epoch)[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return pad_batch(self.arrays, rows, self.batch_size)


def eval_batches(arrays: Arrays, batch_size: int,
                 num_devices: int) -> Iterator[dict[str, np.ndarray]]:
    """One pass over `arrays` in order; the last batch padded with weight-0 rows.

    `batch_size=0` gives the whole set as one batch. Every example is counted exactly once.
    """
    size = validate_arrays(arrays, "evaluation data")
    arrays = {name: np.asarray(a) for name, a in arrays.items()}
    step = padded_size(size if batch_size == 0 else batch_size, num_devices)
    for start in range(0, size, step):
        rows = np.arange(start, min(start + step, size))
        yield pad_batch(arrays, rows, step)
