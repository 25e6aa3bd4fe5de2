"""ZeRO: the training state split over the devices instead of copied on each (`parallel.shard`).

Plain data parallelism keeps a whole copy of the parameters, the gradients and the optimizer
state on every device. `parallel.shard` keeps the data-parallel algorithm and splits that
state over the same devices (ZeRO stages 1-3, as in DeepSpeed; FSDP in PyTorch):

- `none`: everything replicated; gradients are all-reduced.
- `optimizer`: the gradients are reduce-scattered (`psum_scatter`) instead of all-reduced;
  each device updates its 1/n of the parameters with its 1/n of the optimizer state, and
  the new parameters are all-gathered.
- `gradients`: as `optimizer`, and with `train.grad_accum > 1` every micro-batch's gradient
  is reduce-scattered at once, so the accumulated gradient is held as 1/n too (with
  `optimizer` each device accumulates its own whole gradient and scatters it once). No
  device ever holds the whole reduced gradient in either.
- `params`: the parameters too are stored split, and gathered for the loss. A model that
  gathers each layer's weights where it uses them, inside `nn.remat`
  (`Experiment.gathers_params`, `gather_where_used`; gpt_lm does), holds one layer's
  whole weights at a time, the backward pass gathering them again; otherwise the step
  gathers them all before the loss. The gradient of a gather is a reduce-scatter, so the
  gradients arrive split.

Every leaf is cut by one rule (`jaxdist.parallel.chunks.Chunks`). An optimizer's global
quantities (clipping's global norm, LAMB's per-leaf trust ratios) are summed over the
chunks of all devices (`jaxdist.step.optimizers.build_optimizer(..., across=AXIS)`).

On the host, state is in its logical form (whole leaves, their own shapes); `StateLayout`
converts between the logical form and the split one. A checkpoint keeps the split leaves
split (`StateLayout.checkpoint_form`): each process writes its own devices' chunks, and a
run may resume with another `parallel.shard` or on another number of devices, each leaf
read back in the chunks the new run wants (`StateLayout.restore_targets`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxdist.base.errors import UserError, choose_one_of
from jaxdist.base.pytree import PyTree
from jaxdist.parallel.backend import AXIS, Backend, leaf_dtype, varying_axes
from jaxdist.parallel.chunks import Chunk, Chunks
from jaxdist.parallel.strategies import SplitGradients, SplitOptimizer, SplitParams, Strategy

SHARDS = ("none", "optimizer", "gradients", "params")


def check_shard(shard: str) -> None:
    """Refuse (one line) an unknown `parallel.shard`."""
    if shard not in SHARDS:
        raise UserError(choose_one_of(f"parallel.shard={shard}", SHARDS))


class StateLayout:
    """Which leaves of a run's `TrainState` are split over the devices, and how.

    Built from the run's logical host state (whole leaves), the optimizer and the device
    count. `sharded` is a tree of the state's structure: True for a split leaf. With one
    device, or `parallel.shard=none`, nothing is split.
    """

    def __init__(self, shard: str, state: PyTree, tx: Any, backend: Backend):
        check_shard(shard)
        self.devices = len(backend.global_devices)
        self.shard = shard if self.devices > 1 else "none"
        self.param_chunks = jax.tree.map(lambda x: Chunks.of(np.shape(x), self.devices),
                                         state.params)
        split_opt = self.shard != "none"
        opt_split = _follows_params(tx, state.params, backend) if split_opt else (
            jax.tree.map(lambda _: False, state.opt_state))
        self.sharded = type(state)(
            step=False, params=jax.tree.map(lambda _: self.shard == "params", state.params),
            opt_state=opt_split, rng=False,
            model_state=jax.tree.map(lambda _: False, state.model_state))
        # A leaf's Chunks, or False for a replicated leaf.
        self._chunks = jax.tree.map(
            lambda split, x: Chunks.of(np.shape(x), self.devices) if split else False,
            self.sharded, state)
        self.logical = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), leaf_dtype(x)),
                                    state)

    def strategy(self) -> Strategy:
        """What the train step does for this layout (`jaxdist.parallel.strategies`)."""
        if self.shard == "none":
            return Strategy()
        kinds = {"optimizer": SplitOptimizer, "gradients": SplitGradients,
                 "params": SplitParams}
        return kinds[self.shard](self)

    @property
    def splits_anything(self) -> bool:
        """Whether any leaf is split (False for `none` and for one device)."""
        return self.shard != "none"

    @property
    def sharded_or_none(self) -> PyTree:
        """`sharded` where something is split, else None (the backends' replicated path)."""
        return self.sharded if self.splits_anything else None

    def split_shapes(self, state: PyTree) -> PyTree:
        """The shapes of `state` as `to_devices` gets it: `[devices, chunk]` where split."""
        return jax.tree.map(
            lambda c, x: jax.ShapeDtypeStruct((self.devices, c.chunk), leaf_dtype(x))
            if c else jax.ShapeDtypeStruct(np.shape(x), leaf_dtype(x)),
            self._chunks, state)

    def to_devices(self, backend: Backend, state: PyTree) -> PyTree:
        """Place a logical host state on the devices, split where the layout says.

        A split leaf may also come as the global array `restore_targets` asks a checkpoint
        for: it stays on the devices it is on.
        """
        if not self.splits_anything:
            return backend.replicate(state)
        host = jax.tree.map(
            lambda c, x: c.split_host(x) if c and not isinstance(x, jax.Array) else x,
            self._chunks, state)
        return backend.place(host, self.sharded)

    def checkpoint_form(self, backend: Backend, state: PyTree) -> PyTree:
        """The state on the devices as a checkpoint holds it, nothing joined on a host.

        Each split leaf is a global array `[devices * chunk]` on the devices that hold its
        chunks (each process writes its own); every other leaf is one host copy (numpy).
        """
        if not self.splits_anything:
            return backend.first_copy(state)
        whole = backend.first_copy(jax.tree.map(lambda split, x: None if split else x,
                                                self.sharded, state))
        return jax.tree.map(lambda split, x, copy: backend.split_to_global(x) if split else copy,
                            self.sharded, state, whole)

    def split_leaves(self) -> dict[str, int]:
        """`{path: devices}` of the split leaves, as a checkpoint's meta names them."""
        with_paths = jax.tree_util.tree_flatten_with_path(self.sharded)[0]
        return {jax.tree_util.keystr(path): self.devices for path, split in with_paths
                if split}

    def restore_targets(self, backend: Backend) -> PyTree:
        """The global array each split leaf is read back as from a checkpoint, else None."""
        sharding = backend.split_sharding()
        return jax.tree.map(
            lambda c, x: jax.ShapeDtypeStruct((self.devices * c.chunk,), x.dtype,
                                              sharding=sharding) if c else None,
            self._chunks, self.logical)

    def to_host(self, backend: Backend, state: PyTree) -> PyTree:
        """The logical host state (numpy) of a state on the devices in this layout.

        Each device's chunk is copied to the host and the chunks are joined there; in a
        multi-process run every process takes part (the chunks of other processes'
        devices come by an all-gather between processes).
        """
        if not self.splits_anything:
            return backend.first_copy(state)
        host = backend.to_host(state, self.sharded)
        return jax.tree.map(lambda c, x: c.join_host(x) if c else x, self._chunks, host)

    def params_to_host(self, backend: Backend, params: PyTree) -> PyTree:
        """The logical parameters (numpy) of parameters on the devices in this layout."""
        if self.shard != "params":
            return backend.first_copy(params)
        split = jax.tree.map(lambda _: True, params)
        host = backend.to_host(params, split)
        return jax.tree.map(lambda c, x: c.join_host(x), self.param_chunks, host)

    # Inside a mapped step:

    def own_params(self, params: PyTree) -> PyTree:
        """The chunks of whole parameters that this device holds."""
        return jax.tree.map(lambda c, x: c.own(x), self.param_chunks, params)

    def scatter_sum(self, grads: PyTree) -> PyTree:
        """The chunks this device holds of the sum over devices of whole gradients.

        One reduce-scatter per bucket of leaves (`_buckets`), not one per leaf: the padded
        leaves are laid side by side as `[devices, chunk]` rows, so that device i's part is
        chunk i of every leaf.
        """
        leaves, treedef = jax.tree.flatten(grads)
        leaf_chunks = treedef.flatten_up_to(self.param_chunks)
        out: list[Any] = [None] * len(leaves)
        for indices in _buckets(leaves, leaf_chunks):
            if len(indices) == 1:
                flat = leaf_chunks[indices[0]].padded(leaves[indices[0]])
            else:
                flat = jnp.concatenate([leaf_chunks[i].padded(leaves[i]).reshape(self.devices, -1)
                                        for i in indices], axis=1).reshape(-1)
            mine = jax.lax.psum_scatter(flat, AXIS, scatter_dimension=0, tiled=True)
            widths = [leaf_chunks[i].chunk for i in indices]
            for i, part in zip(indices, _split(mine, widths), strict=True):
                out[i] = part
        return jax.tree.unflatten(treedef, out)

    def gather_params(self, chunks: PyTree) -> PyTree:
        """Whole parameters from every device's chunks, replicated (for the new state).

        One all-gather per bucket of the leaves' chunks side by side (see `scatter_sum`).
        """
        leaves, treedef = jax.tree.flatten(chunks)
        leaf_chunks = treedef.flatten_up_to(self.param_chunks)
        out: list[Any] = [None] * len(leaves)
        for indices in _buckets(leaves, leaf_chunks):
            mine = (leaves[indices[0]] if len(indices) == 1
                    else jnp.concatenate([leaves[i] for i in indices]))
            rows = _all_gather_invariant(mine).reshape(self.devices, -1)
            widths = [leaf_chunks[i].chunk for i in indices]
            for i, part in zip(indices, _split(rows, widths, axis=1), strict=True):
                out[i] = leaf_chunks[i].join(part)
        return jax.tree.unflatten(treedef, out)

    def gathered(self, chunks: PyTree) -> PyTree:
        """Whole parameters from every device's chunks, for use in this step only."""
        return jax.tree.map(lambda c, x: c.gather(x), self.param_chunks, chunks)

    def mask_padding(self, updates: PyTree) -> PyTree:
        """Updates with their padding zeroed, so that it never enters the parameters."""
        return jax.tree.map(lambda c, u: jnp.where(c.real(), u, jnp.zeros_like(u)),
                            self.param_chunks, updates)

    def gathering_loss(self, loss: Callable, by_model: bool = False) -> Callable:
        """`loss(params, ...)` taking this device's parameter chunks.

        The whole parameters are gathered first; or, with `by_model`, the loss gets the
        chunks and gathers each layer's where it uses them (`gather_where_used`). Either
        way the gradient of the gather is a reduce-scatter, so it arrives in chunks.
        """

        def with_gathered(chunks, *args):
            return loss(self.gathered(chunks), *args)

        def with_chunks(chunks, *args):
            return loss(jax.tree.map(Chunk, chunks, self.param_chunks), *args)

        return with_chunks if by_model else with_gathered


BUCKET_BYTES = 4 << 20  # leaves smaller than this travel together, up to this many bytes


def _buckets(leaves: list[jax.Array], leaf_chunks: list[Chunks]) -> list[list[int]]:
    """The indices of `leaves` in buckets: small leaves of one dtype together, large alone.

    A collective per leaf costs a fixed overhead each (20% of gpt_lm tiny's step on 8
    CPU devices, whose leaves are all small); laying leaves side by side for one
    collective costs a copy of them, which for large leaves is memory better left alone.
    """
    buckets: list[list[int]] = []
    open_bucket: dict[Any, tuple[list[int], int]] = {}
    for index, (leaf, chunks) in enumerate(zip(leaves, leaf_chunks, strict=True)):
        dtype = jnp.dtype(leaf.dtype)
        size = chunks.devices * chunks.chunk * dtype.itemsize
        if size >= BUCKET_BYTES:
            buckets.append([index])
            continue
        members, held = open_bucket.get(dtype, ([], 0))
        if members and held + size > BUCKET_BYTES:
            buckets.append(members)
            members, held = [], 0
        open_bucket[dtype] = (members + [index], held + size)
    buckets.extend(members for members, _ in open_bucket.values())
    return buckets


def _split(x: jax.Array, widths: list[int], axis: int = 0) -> list[jax.Array]:
    """`x` cut along `axis` into consecutive parts of these widths."""
    offsets = np.cumsum([0, *widths])
    return [jax.lax.slice_in_dim(x, int(a), int(b), axis=axis)
            for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def _follows_params(tx: Any, params: PyTree, backend: Backend) -> PyTree:
    """Which leaves of `tx.init(params)` follow the parameters (and are split with them).

    `tx.init` is traced (nothing computed) on parameter chunks that differ across devices;
    an output leaf that differs too was computed from them (Adam's moments); one that does
    not (a step count, a learning rate) is replicated.
    """
    found: list[bool] = []

    def probe(params):
        state = tx.init(params)
        found.extend(AXIS in varying_axes(leaf) for leaf in jax.tree.leaves(state))
        return jax.tree.map(lambda _: jnp.zeros(()), state)

    devices = backend.mesh.size
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        (Chunks.of(np.shape(x), devices).chunk * devices,), leaf_dtype(x)), params)
    mapped = jax.shard_map(probe, mesh=backend.mesh, in_specs=P(AXIS), out_specs=P(),
                           check_vma=True)
    structure = jax.eval_shape(mapped, shapes)
    return jax.tree.unflatten(jax.tree.structure(structure), found)


def _all_gather_invariant(x: jax.Array) -> jax.Array:
    """An all-gather whose result shard_map knows to be the same on every device."""
    gather = getattr(jax.lax, "all_gather_invariant", None)
    if gather is None:
        from jax._src.lax import parallel  # jax 0.10 keeps it private

        gather = getattr(parallel, "all_gather_invariant", None)
    if gather is not None:
        return gather(x, AXIS, tiled=True)
    # Each device puts its chunk in place in zeros; the sum is every chunk (exact: x + 0).
    devices = jax.lax.psum(1, AXIS)
    placed = jnp.zeros((devices, *x.shape), x.dtype).at[jax.lax.axis_index(AXIS)].set(x)
    return jax.lax.psum(placed, AXIS).reshape(-1, *x.shape[1:])
