"""How one leaf is cut into equal chunks over the devices, for every `parallel.shard` but none.

Every leaf is cut the same way: flattened, padded with zeros to a multiple of n, and cut into
n equal chunks; device i holds chunk i. The padding stays zero (updates are masked there) and
is cut off whenever a leaf is put back together. `Chunks` is that rule, written once: the
step, the optimizer's global quantities and the checkpoint's split leaves all use it.
`Chunk` and `gather_where_used` let a model gather each layer's weights where it uses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxdist.base.pytree import PyTree
from jaxdist.parallel.backend import AXIS, leaf_dtype


@dataclass(frozen=True)
class Chunks:
    """How one leaf is chunked: its logical shape, its size, and the length of each chunk."""

    shape: tuple[int, ...]
    size: int
    chunk: int
    devices: int

    @classmethod
    def of(cls, shape: tuple[int, ...], devices: int) -> Chunks:
        """The chunks of a leaf of `shape` over `devices` devices (at least 1 element each)."""
        size = math.prod(shape)
        return cls(tuple(shape), size, max(1, -(-size // devices)), devices)

    def padded(self, x: jax.Array) -> jax.Array:
        """`x` flattened and padded with zeros to `devices * chunk` (inside a step)."""
        flat = x.reshape(-1)
        missing = self.devices * self.chunk - self.size
        return jnp.pad(flat, (0, missing)) if missing else flat

    def own(self, x: jax.Array) -> jax.Array:
        """The chunk of a whole (replicated) leaf `x` that this device holds (inside a step)."""
        start = jax.lax.axis_index(AXIS) * self.chunk
        return jax.lax.dynamic_slice_in_dim(self.padded(x), start, self.chunk)

    def gather(self, chunk: jax.Array) -> jax.Array:
        """The whole leaf from every device's chunk (an all-gather), padding cut off.

        Typed as differing across devices, as the chunks do: differentiating through it
        reduce-scatters the gradient.
        """
        whole = jax.lax.all_gather(chunk, AXIS, tiled=True)
        return whole[:self.size].reshape(self.shape)

    def join(self, rows: jax.Array) -> jax.Array:
        """The whole leaf from every device's chunk as rows `[devices, chunk]` (in a step)."""
        return rows.reshape(-1)[:self.size].reshape(self.shape)

    def real(self) -> jax.Array:
        """True where this device's chunk holds the leaf, False on its padding."""
        start = jax.lax.axis_index(AXIS) * self.chunk
        return start + jnp.arange(self.chunk) < self.size

    def split_host(self, x: np.ndarray) -> np.ndarray:
        """A whole host leaf as `[devices, chunk]`, zero-padded."""
        flat = np.zeros(self.devices * self.chunk, leaf_dtype(x))
        flat[:self.size] = np.asarray(x).reshape(-1)
        return flat.reshape(self.devices, self.chunk)

    def join_host(self, x: np.ndarray) -> np.ndarray:
        """A host leaf `[devices, chunk]` back in its logical shape."""
        return np.asarray(x).reshape(-1)[:self.size].reshape(self.shape)


@jax.tree_util.register_pytree_node_class
class Chunk:
    """A device's chunk of one parameter, and the `Chunks` of its whole leaf.

    What a loss of `Experiment.gathers_params=True` gets for each parameter under
    `parallel.shard=params`; `gather_where_used` makes it whole. A pytree node (its array
    the one child, its `Chunks` static), so it passes through `jax.grad`, `nn.remat` and
    flax's variable transforms like the array it holds.
    """

    def __init__(self, data: jax.Array, chunks: Chunks):
        self.data, self.chunks = data, chunks

    def tree_flatten(self) -> tuple[tuple[jax.Array], Chunks]:
        """The array is the child; its `Chunks` ride as static data."""
        return (self.data,), self.chunks

    @classmethod
    def tree_unflatten(cls, chunks: Chunks, children: tuple[jax.Array]) -> Chunk:
        """Rebuild from `tree_flatten`'s parts."""
        return cls(children[0], chunks)


def gather_where_used(tree: PyTree) -> PyTree:
    """Whole parameters from this device's chunks, for a model that gathers layer by layer.

    Inside a step with `parallel.shard=params` of an experiment with `gathers_params=True`,
    the loss function gets each parameter as a `Chunk`; a layer calls this on its own
    parameters where it uses them. Any other leaf is returned as it is, so the same model
    code serves every `parallel.shard`. Call it inside the layer's `nn.remat` for the
    backward pass to gather again rather than keep the whole weights.
    """
    return jax.tree.map(lambda x: x.chunks.gather(x.data) if isinstance(x, Chunk) else x, tree,
                        is_leaf=lambda x: isinstance(x, Chunk))
