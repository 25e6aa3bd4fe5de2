"""Random-access data sources: a length, and rows by index as a dict of numpy arrays.

- `ArraySource`: in-memory arrays.
- `MapSource`: anything with `__len__` and `__getitem__(i) -> dict` (a grain `MapDataset`,
  an ArrayRecord source wrapped to decode records, a Hugging Face `datasets.Dataset` with
  `.with_format("numpy")`); one with `__getitems__(list)` is read a batch at a time.
- `NpyFolderSource` (in `jaxdist.data.shards`): a folder of `.npy`/`.npz` shard files,
  never loaded whole nor memory-mapped: each batch reads its rows with `os.pread`.

Every source offers `get_batch(indices) -> dict[name, array[len(indices), ...]]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from jaxdist.base.errors import UserError

WEIGHT = "weight"


@runtime_checkable
class Source(Protocol):
    """What the loader needs of a data set."""

    def __len__(self) -> int:
        """The number of examples."""

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The examples at `indices`, stacked along a new first axis."""


def validate_arrays(arrays: Mapping[str, np.ndarray], what: str = "data") -> int:
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


class ArraySource:
    """Examples held in memory as a dict of equal-length arrays."""

    def __init__(self, arrays: Mapping[str, np.ndarray], what: str = "data"):
        self.arrays = {name: np.asarray(a) for name, a in arrays.items()}
        self.size = validate_arrays(self.arrays, what)

    def __len__(self) -> int:
        return self.size

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Gather the rows at `indices` of every array."""
        return {name: a[indices] for name, a in self.arrays.items()}

    def column(self, name: str) -> np.ndarray:
        """All rows of one array."""
        return _column(self.arrays, name)


class MapSource:
    """Adapts any `len()`-able object whose `obj[i]` is a dict of arrays (or scalars)."""

    def __init__(self, dataset: Any, what: str = "data"):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise UserError(f"{what} must have __len__ and __getitem__; got "
                            f"{type(dataset).__name__}")
        self.dataset = dataset
        if len(dataset) == 0:
            raise UserError(f"{what} is empty; it needs at least one example")
        first = dataset[0]
        if not isinstance(first, Mapping):
            raise UserError(f"{what}[0] is a {type(first).__name__}; each example must be a "
                            f"dict of arrays")
        self.names = list(first)

    def __len__(self) -> int:
        return len(self.dataset)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Fetch the examples (in one call where the data set reads batches) and stack them.

        A data set with `__getitems__(list)` (Hugging Face `datasets`, grain, PyTorch's
        convention) is asked for the whole batch at once; others example by example.
        """
        keys = [int(i) for i in indices]
        many = getattr(self.dataset, "__getitems__", None)
        examples = many(keys) if callable(many) else [self.dataset[i] for i in keys]
        return {name: np.stack([np.asarray(e[name]) for e in examples]) for name in self.names}

    def column(self, name: str) -> np.ndarray:
        """One field of every example (reads them all)."""
        _column(dict.fromkeys(self.names), name)
        return np.stack([np.asarray(self.dataset[i][name]) for i in range(len(self))])


def _column(arrays: Mapping[str, Any], name: str) -> Any:
    if name not in arrays:
        raise UserError(f"the data has no array {name!r} (it has {', '.join(arrays)}); set "
                        f"loader.label_key to one of them")
    return arrays[name]


def column(source: Source, name: str) -> np.ndarray:
    """All values of array `name` of `source` (e.g. the labels, for balanced sampling)."""
    if hasattr(source, "column"):
        return np.asarray(source.column(name))
    return _column(source.get_batch(np.arange(len(source))), name)


def as_source(data: Any, what: str = "data") -> Source:
    """Wrap `data` as a source: a source as is, a dict of arrays, or a map-style data set."""
    if isinstance(data, Mapping):
        return ArraySource(data, what)
    if hasattr(data, "get_batch") and hasattr(data, "__len__"):
        if len(data) == 0:
            raise UserError(f"{what} is empty; it needs at least one example")
        return data
    return MapSource(data, what)

