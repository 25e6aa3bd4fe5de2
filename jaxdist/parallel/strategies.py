"""What a train step does that depends on where its state lies: one strategy per layout.

`parallel.shard`'s four values (`jaxdist.parallel.layout`) are four `Strategy` objects,
which the step (`jaxdist.step.steps.make_train_step`) calls inside the mapped function:
they wrap the loss (`params` gathers the parameters for it), reduce the gradients
(all-reduce, or reduce-scatter into this device's chunk), pick the parameters the optimizer
updates (the whole ones, or this device's chunk) and apply the update (gathering the new
parameters where they are stored whole).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
import optax

from jaxdist.base.pytree import PyTree
from jaxdist.parallel.backend import AXIS


class SplitLayout(Protocol):
    """The collectives on chunks that a split strategy calls (`layout.StateLayout` has them)."""

    def scatter_sum(self, grads: PyTree) -> PyTree:
        """The chunks, on this device, of the sum over the devices of whole gradients."""

    def own_params(self, params: PyTree) -> PyTree:
        """The chunks of whole parameters that this device holds."""

    def gather_params(self, chunks: PyTree) -> PyTree:
        """Whole parameters from every device's chunks."""

    def mask_padding(self, updates: PyTree) -> PyTree:
        """Updates with the chunks' padding zeroed."""

    def gathering_loss(self, loss: Callable, by_model: bool = False) -> Callable:
        """`loss` taking this device's parameter chunks."""


class Strategy:
    """Everything replicated (`parallel.shard=none`, or one device): gradients all-reduced."""

    splits = False  # whether the gradients and the optimizer state come in chunks

    def total(self, tree: PyTree) -> PyTree:
        """The sum over the devices of every device's `tree` (metrics, weights)."""
        return jax.lax.psum(tree, AXIS)

    def loss(self, loss: Callable, by_model: bool = False) -> Callable:
        """The loss (or evaluation) function as the step calls it on the stored params."""
        return loss

    def micro_gradients(self, grads: PyTree, accumulating: bool) -> PyTree:
        """One micro-batch's gradient, as it is added to the accumulated one."""
        return grads

    def reduce(self, grads: PyTree, accumulating: bool) -> PyTree:
        """The sum over the devices of the (accumulated) gradients, as the optimizer takes it."""
        return self.total(grads)

    def own(self, params: PyTree) -> PyTree:
        """The parameters this device's optimizer state belongs to."""
        return params

    def apply(self, own: PyTree, updates: PyTree) -> PyTree:
        """The new parameters, as the state stores them."""
        return optax.apply_updates(own, updates)

    def all_finite(self, tree: PyTree) -> jax.Array:
        """Whether every entry of `tree` (the same on every device) is finite."""
        return jnp.isfinite(_sum(tree))


class SplitOptimizer(Strategy):
    """`optimizer`: the gradients reduce-scattered once, each device updating its chunk."""

    splits = True

    def __init__(self, layout: SplitLayout):
        self.layout = layout

    def reduce(self, grads: PyTree, accumulating: bool) -> PyTree:
        """The chunk of the gradients' sum this device updates (one reduce-scatter per bucket)."""
        return self.layout.scatter_sum(grads)

    def own(self, params: PyTree) -> PyTree:
        """The chunk of the whole parameters that this device updates."""
        return self.layout.own_params(params)

    def apply(self, own: PyTree, updates: PyTree) -> PyTree:
        """The whole new parameters, all-gathered from every device's updated chunk."""
        return self.layout.gather_params(self._updated(own, updates))

    def _updated(self, own: PyTree, updates: PyTree) -> PyTree:
        return optax.apply_updates(own, self.layout.mask_padding(updates))

    def all_finite(self, tree: PyTree) -> jax.Array:
        """Whether every entry of every device's chunks is finite (the same verdict on all)."""
        return jnp.isfinite(jax.lax.psum(_sum(tree), AXIS))


class SplitGradients(SplitOptimizer):
    """`gradients`: as `optimizer`, and each micro-batch's gradient is scattered at once."""

    def micro_gradients(self, grads: PyTree, accumulating: bool) -> PyTree:
        """With accumulation, this device's chunk of the micro-batch's gradient sum."""
        return self.layout.scatter_sum(grads) if accumulating else grads

    def reduce(self, grads: PyTree, accumulating: bool) -> PyTree:
        """The chunk of the gradients' sum this device updates (scattered when accumulating)."""
        return grads if accumulating else self.layout.scatter_sum(grads)


class SplitParams(SplitOptimizer):
    """`params`: the parameters stored in chunks, gathered for the loss.

    The gradient of the gather is a reduce-scatter: the gradients arrive in chunks.
    """

    def loss(self, loss: Callable, by_model: bool = False) -> Callable:
        """The loss on this device's chunks (gathered first, or by the model: `by_model`)."""
        return self.layout.gathering_loss(loss, by_model=by_model)

    def reduce(self, grads: PyTree, accumulating: bool) -> PyTree:
        """The gradients as they came: chunks of the sum already."""
        return grads

    def own(self, params: PyTree) -> PyTree:
        """The stored chunks."""
        return params

    def apply(self, own: PyTree, updates: PyTree) -> PyTree:
        """The updated chunks, stored as they are."""
        return self._updated(own, updates)


def _sum(tree: PyTree) -> jax.Array:
    # A NaN or inf anywhere makes the sum non-finite (inf - inf is NaN): one reduction pass.
    return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(tree))
