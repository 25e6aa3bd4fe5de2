"""Host-side data: sources, the sharded loader, and prefetching onto the devices."""

from jaxdist.data.loader import (
    Loader,
    check_split,
    class_balanced_probabilities,
    epoch_order,
    eval_batches,
    training_loader,
)
from jaxdist.data.prefetch import DevicePrefetcher
from jaxdist.data.row_random import RowRandom
from jaxdist.data.shards import NpyFolderSource, write_shards
from jaxdist.data.sources import (
    ArraySource,
    MapSource,
    Source,
    as_source,
    column,
    validate_arrays,
)

__all__ = [
    "ArraySource",
    "DevicePrefetcher",
    "Loader",
    "MapSource",
    "NpyFolderSource",
    "RowRandom",
    "Source",
    "as_source",
    "column",
    "check_split",
    "class_balanced_probabilities",
    "epoch_order",
    "eval_batches",
    "training_loader",
    "validate_arrays",
    "write_shards",
]
