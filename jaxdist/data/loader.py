"""The sharded loader: which examples each process and device gets, step after step.

One global batch of `B` examples per step. Epoch `e` visits the examples in an order that
is a pure function of `(seed, e)`; global batch `t` is positions `[t*B, (t+1)*B)` of that
order. Process `p` of `P` reads only its slice `[p*B/P, (p+1)*B/P)` of each global batch,
and the backend splits that slice over the process's devices, `B/(P*D)` examples each. So
the union over all processes of one epoch is every example exactly once, and a run on
2 processes x 4 devices sees the very same per-device batches as 1 process x 8 devices.

Rows past the end of the data (the short last batch when `drop_remainder=False`, or the
padding of a full batch) carry weight 0; the core's exact weighting makes them harmless.
They are copies of real rows, not zeros, so a loss that would not be finite on a row of
zeros (one that divides by its target, say) stays finite on them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxdist.base.errors import UserError
from jaxdist.data.row_random import RowRandom
from jaxdist.data.sources import WEIGHT, Source, as_source, column

if TYPE_CHECKING:
    from jaxdist.base.config import Config

Transform = Callable[[dict[str, np.ndarray], RowRandom], dict[str, np.ndarray]]


def check_split(batch_size: int, process_count: int, local_devices: int) -> None:
    """Refuse a global batch that does not split evenly over processes and devices."""
    parts = process_count * local_devices
    if batch_size % parts:
        lower = max(parts, batch_size - batch_size % parts)
        where = (f"{process_count} processes x {local_devices} devices" if process_count > 1
                 else f"{local_devices} devices")
        raise UserError(f"train.batch_size={batch_size} cannot be split over {where}; use a "
                        f"multiple of {parts} (e.g. train.batch_size={lower}) or "
                        f"train.batch_size=full")


def padded_size(count: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that holds `count` rows."""
    return -(-count // multiple) * multiple


def class_balanced_probabilities(labels: np.ndarray) -> np.ndarray:
    """Per-example sampling probabilities under which every class is equally likely.

    `labels` are class indices `[N]`, or one-hot (or soft) rows `[N, classes]`, whose class
    is their arg-max.
    """
    labels = np.asarray(labels).reshape(len(labels), -1)
    labels = labels[:, 0] if labels.shape[1] == 1 else labels.argmax(axis=1)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    per_example = 1.0 / (len(classes) * counts[inverse])
    return per_example / per_example.sum()


def epoch_order(size: int, seed: int, epoch: int, shuffle: bool = True,
                probabilities: np.ndarray | None = None) -> np.ndarray:
    """The example indices of epoch `epoch`: a pure function of `(seed, epoch)`.

    With `probabilities`, an epoch is `size` draws with replacement (balanced sampling);
    otherwise it is a permutation (or the stored order when `shuffle` is off).
    """
    if probabilities is not None:
        rng = np.random.default_rng([seed, epoch])
        return rng.choice(size, size=size, replace=True, p=probabilities)
    if not shuffle:
        return np.arange(size)
    return np.random.default_rng([seed, epoch]).permutation(size)


def gather(source: Source, indices: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `indices` of `source`, plus `weight`: 1 where `valid`, 0 for padding rows.

    Every index must be a real row: padding rows repeat one (their weight keeps them out).
    """
    batch = dict(source.get_batch(indices))
    batch[WEIGHT] = valid.astype(np.float32)
    return batch


class Loader:
    """Endless training batches for this process, with a resumable position.

    - `batch_size=0` (full batch): every step is the whole set in its stored order, padded
      to a multiple of `process_count * local_devices`; the same dict object is returned
      each time, so it is placed on the devices once.
    - otherwise each epoch is cut into global batches of `batch_size`. With
      `drop_remainder` the incomplete last one is skipped; without, it is padded.

    `state()` is `{"epoch": e, "index": i}` (the position of the next global batch);
    `restore(state)` continues with exactly the batches an uninterrupted loader gives.

    `transform(batch, rng)` (optional) changes each training batch on the host, e.g. random
    crops; `rng` is a `RowRandom` whose row r is seeded from (seed, epoch, the row's global
    position), so it repeats exactly, on any number of processes. It is not applied to a
    full batch, which is fixed.
    """

    def __init__(self, data: Any, batch_size: int, local_devices: int, *, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                 drop_remainder: bool = True, probabilities: np.ndarray | None = None,
                 transform: Transform | None = None):
        self.source = as_source(data, "training data")
        self.size = len(self.source)
        self.seed, self.shuffle, self.probabilities = seed, shuffle, probabilities
        self.process_index, self.process_count = process_index, process_count
        if not 0 <= process_index < process_count:
            raise UserError(f"process index {process_index} is not in [0, {process_count})")
        parts = process_count * local_devices
        self.full = batch_size == 0
        if self.full:
            self.batch_size = padded_size(self.size, parts)
        else:
            check_split(batch_size, process_count, local_devices)
            if drop_remainder and batch_size > self.size:
                raise UserError(f"train.batch_size={batch_size} is larger than the {self.size} "
                                f"training examples; use a smaller batch or "
                                f"train.batch_size=full")
            self.batch_size = batch_size
        if probabilities is not None and len(probabilities) != self.size:
            raise UserError(f"sampling probabilities have {len(probabilities)} entries for "
                            f"{self.size} examples")
        self.drop_remainder = drop_remainder
        self.transform = transform
        self.local_batch_size = self.batch_size // process_count
        self.epoch, self.index = 0, 0
        self._order: tuple[int, np.ndarray] | None = None
        self._full_batch: dict[str, np.ndarray] | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in one epoch."""
        if self.full:
            return 1
        whole, rest = divmod(self.size, self.batch_size)
        return whole + (1 if rest and not self.drop_remainder else 0)

    def order(self, epoch: int) -> np.ndarray:
        """Example indices of `epoch` (cached for the current epoch)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.size, self.seed, epoch, self.shuffle,
                                              self.probabilities))
        return self._order[1]

    def state(self) -> dict[str, int]:
        """The position: the epoch and the index in it of the next global batch."""
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a position returned by `state()`."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.size + max(self.batch_size, 1):
            raise UserError(f"loader position {dict(state)} does not fit a data set of "
                            f"{self.size} examples; the checkpoint belongs to other data")
        self.epoch, self.index = epoch, index

    def peek(self) -> dict[str, np.ndarray]:
        """The next batch, without moving the position (e.g. to trace a step on it)."""
        position = self.state()
        batch = next(self)
        self.epoch, self.index = position["epoch"], position["index"]
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.full:
            self.epoch += 1
            if self._full_batch is None:
                self._full_batch = self._local_batch(np.arange(self.size),
                                                     self._positions(0))
            return self._full_batch
        remaining = self.size - self.index
        if remaining <= 0 or (self.drop_remainder and remaining < self.batch_size):
            self.epoch, self.index = self.epoch + 1, 0
        positions = self._positions(self.index)
        batch = self._local_batch(self.order(self.epoch), positions)
        if self.transform is not None:
            rng = RowRandom(self.seed, self.epoch, positions)
            weight = batch.pop(WEIGHT)
            batch = {**self.transform(batch, rng), WEIGHT: weight}
        self.index += self.batch_size
        return batch

    def _positions(self, start: int) -> np.ndarray:
        """Positions in the epoch's order of this process's rows of the batch at `start`."""
        first = start + self.process_index * self.local_batch_size
        return np.arange(first, first + self.local_batch_size)

    def _local_batch(self, order: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
        valid = positions < len(order)
        return gather(self.source, order[np.minimum(positions, len(order) - 1)], valid)


def training_loader(data: Any, config: Config, local_devices: int,
                    transform: Transform | None = None) -> Loader:
    """The training loader for this process, as `config.train` and `config.loader` say."""
    import jax

    source = as_source(data, "the training data")
    probabilities = None
    if config.loader.sampling == "balanced":
        if config.train.batch_size == 0:
            raise UserError("loader.sampling=balanced draws examples for each batch, but "
                            "train.batch_size=full uses every example once per step; set "
                            "train.batch_size=N or loader.sampling=uniform")
        probabilities = class_balanced_probabilities(column(source, config.loader.label_key))
    return Loader(source, config.train.batch_size, local_devices, seed=config.train.seed,
                  process_index=jax.process_index(), process_count=jax.process_count(),
                  shuffle=config.loader.shuffle, drop_remainder=config.loader.drop_remainder,
                  probabilities=probabilities, transform=transform)


def eval_batches(data: Any, batch_size: int, local_devices: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """One pass over `data` in stored order, this process's slice of each global batch.

    `batch_size=0` gives the whole set as one global batch. The last batch is padded with
    weight-0 rows, so every example is counted exactly once; every process yields the same
    number of batches.
    """
    source = as_source(data, "evaluation data")
    size = len(source)
    parts = process_count * local_devices
    global_batch = padded_size(size if batch_size == 0 else batch_size, parts)
    local = global_batch // process_count
    for start in range(0, size, global_batch):
        positions = np.arange(start + process_index * local, start + (process_index + 1) * local)
        valid = positions < size
        yield gather(source, np.minimum(positions, size - 1), valid)
