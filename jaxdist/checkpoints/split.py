"""How a state split over the devices lies in a checkpoint, and how it is read back.

A state split over the devices (`parallel.shard`) is saved as it lies: each split leaf is a
global array `[devices * chunk]` (flattened, zero-padded), and each process writes the
chunks of its own devices (orbax's `ocdbt.process_N/`), so no host ever holds the whole
state. `meta.json` names the split leaves and the device count they were cut for. A restore
reads each split leaf into the chunks the new run wants: another device count reads other
ranges of the same flat leaf (orbax cuts or zero-pads the padding at its end), and a run
that keeps a leaf whole gets it back in its logical shape.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxdist.parallel.backend import leaf_dtype
from jaxdist.parallel.chunks import Chunks
from jaxdist.parallel.processes import barrier_timeout


def joint_checkpointer() -> ocp.StandardCheckpointer:
    """An orbax checkpointer that every process writes with (a state split over them all).

    Naming every process as active makes orbax meet them at the coordination service's
    barriers, which time out (orbax's own limit), instead of a device collective, which
    waits for ever; its background commit waits at most `--barrier-timeout`.
    """
    return ocp.StandardCheckpointer(
        async_options=ocp.options.AsyncOptions(timeout_secs=barrier_timeout()),
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=0, active_processes=set(range(jax.process_count()))))


def as_saved(key: str, leaf: Any, split: dict[str, int], want: Any) -> Any:
    """What orbax should read a leaf as: the wanted cut, the saved flat leaf, or numpy."""
    if key not in split:
        return leaf
    if want is not None:
        return want
    chunks = Chunks.of(np.shape(leaf), split[key])
    return np.zeros(chunks.devices * chunks.chunk, leaf_dtype(leaf))


def as_asked(key: str, leaf: Any, got: Any, split: dict[str, int], want: Any) -> Any:
    """A restored leaf in the form asked for: a split leaf wanted whole is cut and reshaped."""
    if key in split and want is None:
        return np.asarray(got).reshape(-1)[:math.prod(np.shape(leaf))].reshape(np.shape(leaf))
    return got
