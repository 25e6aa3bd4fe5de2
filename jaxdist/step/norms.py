"""The step's health: global norms of the gradient, the parameters and the update.

The update is the parameters' change over the step (what the step did to them, zero for a
step skipped as non-finite).

Each norm is summed as gradient clipping sums its norm (`jaxdist.step.optimizers.
sum_of_squares`): every leaf is cut into one zero-padded chunk per device, each chunk's
sum of squares is taken as an array of its own, and the sums are added in device order,
then leaf by leaf. Each device squares only its own chunks, whole leaves or split alike
(a replicated leaf is cut here), and the devices' sums are gathered in one all-reduce of
a scalar per leaf and device for the three norms together: a device does 1/n of the work,
and every `parallel.shard` reports the same norms.
"""

from __future__ import annotations

from collections.abc import Callable

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
    """The sums of squares of this device's chunk of each leaf of `tree`, as `[leaves]`.

    `split`: the leaves are this device's chunks already; otherwise they are whole and are
    cut here (inside a mapped step).
    """
    devices = jax.lax.axis_size(AXIS)
    sums = []
    for x in jax.tree.leaves(tree):
        if not split:
            x = Chunks.of(x.shape, devices).own(x)
        sums.append(jnp.sum(jnp.square(x.astype(jnp.float32))))
    return jnp.stack(sums)


def change_square_parts(new: PyTree, old: PyTree, split: bool) -> jax.Array:
    """`square_parts(new - old, split)`, each device subtracting only its own chunks."""
    devices = jax.lax.axis_size(AXIS)
    sums = []
    for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True):
        if not split:
            chunks = Chunks.of(x.shape, devices)
            x, y = chunks.own(x), chunks.own(y)
        sums.append(jnp.sum(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32))))
    return jnp.stack(sums)


def global_norms(parts: list[jax.Array],
                 total: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """The global norm of each tree whose `square_parts` on this device are `parts`.

    The parts of every tree go out together, in one all-reduce: `total`, the step's sum
    over the devices (`Strategy.total`; default `psum` over the device axis).
    """
    total = total or (lambda x: jax.lax.psum(x, AXIS))
    sizes = [p.shape[-1] for p in parts]
    row = jnp.concatenate(parts)
    # Each device's row in its place, summed: the very values an all-gather brings, typed
    # as the same on every device (which the step's outputs must be).
    mine = jax.nn.one_hot(jax.lax.axis_index(AXIS), jax.lax.axis_size(AXIS), dtype=bool)
    rows = total(jnp.where(mine[:, None], row[None, :], 0.0))
    leaves = rows[0]
    for other in rows[1:]:  # device order, as clipping adds them
        leaves = leaves + other
    norms, start = [], 0
    for size in sizes:
        total = leaves[start] if size else jnp.zeros((), jnp.float32)
        for i in range(start + 1, start + size):
            total = total + leaves[i]
        norms.append(jnp.sqrt(total))
        start += size
    return jnp.stack(norms)
