"""The step's health: global norms of the gradient, the parameters and the update.

The update is the parameters' change over the step (what the step did to them, zero for a
step skipped as non-finite).

Each norm is summed as gradient clipping sums its norm (`jaxdist.step.optimizers.
sum_of_squares`): every leaf is cut into one zero-padded chunk per device, each chunk's
sum of squares is taken as an array of its own, and the sums are added in device order,
then leaf by leaf. A device that holds only its chunks (`parallel.shard` other than none)
reduces its own and gathers the others' (one all-reduce of a scalar per leaf and device
for the three norms together), so every `parallel.shard` reports the same norms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdist.base.pytree import PyTree
from jaxdist.parallel.backend import AXIS
from jaxdist.parallel.chunks import Chunks

GRAD_NORM = "grad_norm"
PARAM_NORM = "param_norm"
UPDATE_NORM = "update_norm"
NORM_KEYS = (GRAD_NORM, PARAM_NORM, UPDATE_NORM)


def square_parts(tree: PyTree, split: bool) -> jax.Array:
    """The sums of squares of `tree`'s chunks (inside a mapped step).

    Whole leaves (`split=False`): `[devices, leaves]`, each leaf cut here. This device's
    chunks (`split=True`): `[leaves]`, this device's row of that array.
    """
    leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(tree)]
    if split:
        return jnp.stack([jnp.sum(jnp.square(x)) for x in leaves])
    devices = jax.lax.axis_size(AXIS)
    columns = []
    for x in leaves:
        chunks = Chunks.of(x.shape, devices)
        flat = chunks.padded(x)
        columns.append(jnp.stack([jnp.sum(jnp.square(flat[i * chunks.chunk:
                                                          (i + 1) * chunks.chunk]))
                                  for i in range(devices)]))
    return jnp.stack(columns, axis=1)


def global_norms(parts: list[jax.Array], split: bool) -> jax.Array:
    """The global norm of each tree whose `square_parts` are `parts`, as one vector.

    Split, the parts of every tree go out together, in one all-reduce.
    """
    sizes = [p.shape[-1] for p in parts]
    rows = jnp.concatenate(parts, axis=-1)
    if split:
        # Each device's row in its place, summed: the very values an all-gather brings,
        # typed as the same on every device (which the step's outputs must be).
        mine = jax.nn.one_hot(jax.lax.axis_index(AXIS), jax.lax.axis_size(AXIS), dtype=bool)
        rows = jax.lax.psum(jnp.where(mine[:, None], rows[None, :], 0.0), AXIS)
    leaves = rows[0]
    for row in rows[1:]:  # device order, as clipping adds them
        leaves = leaves + row
    norms, start = [], 0
    for size in sizes:
        total = leaves[start] if size else jnp.zeros((), jnp.float32)
        for i in range(start + 1, start + size):
            total = total + leaves[i]
        norms.append(jnp.sqrt(total))
        start += size
    return jnp.stack(norms)
