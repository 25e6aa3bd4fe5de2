"""The shard_map backend: `jax.jit(jax.shard_map(step, ...))` on a 1-D mesh `batch`.

Replicated values keep their own shape and lie whole on every device of the (global) mesh;
a global batch `[B, ...]` is split along its first axis; a split leaf of the state is one
global array `[devices * chunk]` split along `batch`. Outputs that may differ across
devices are refused by type while compiling (`check_vma=True`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdist.base.pytree import PyTree
from jaxdist.parallel.backend import (
    AXIS,
    Backend,
    StepFn,
    leaf_dtype,
    replicated_step,
    split_leading_axis,
    step_specs,
    unsplit,
)


class ShardMapBackend(Backend):
    """`jax.jit(jax.shard_map(...))` on a 1-D mesh over the selected devices of all processes."""

    name = "shard_map"

    def replicate(self, tree: PyTree) -> PyTree:
        """Place a full copy of every leaf on each device of the (global) mesh.

        Every process passes the same values and places them on its own devices.
        """
        sharding = NamedSharding(self.mesh, P())

        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree.map(put, tree)

    def place(self, tree: PyTree, sharded: PyTree) -> PyTree:
        """A split leaf `[devices, chunk]` as a global `[devices * chunk]` split along `batch`."""
        split_sharding = NamedSharding(self.mesh, P(AXIS))
        replicated = self.replicate(jax.tree.map(lambda split, x: None if split else x,
                                                 sharded, tree))

        def put(split, x, copy):
            if not split:
                return copy
            if isinstance(x, jax.Array):
                return x
            flat = np.asarray(x).reshape(-1)
            return jax.make_array_from_callback(flat.shape, split_sharding,
                                                lambda index: flat[index])

        return jax.tree.map(put, sharded, tree, replicated, is_leaf=lambda x: x is None)

    def placed_shapes(self, tree: PyTree, sharded: PyTree = None) -> PyTree:
        """A split leaf `[devices, chunk]` as `[devices * chunk]` along `batch`; others whole."""
        split_sharding = NamedSharding(self.mesh, P(AXIS))
        replicated = NamedSharding(self.mesh, P())
        return jax.tree.map(lambda split, x: jax.ShapeDtypeStruct(
            (int(np.prod(np.shape(x))),), leaf_dtype(x), sharding=split_sharding) if split else
            jax.ShapeDtypeStruct(np.shape(x), leaf_dtype(x), sharding=replicated),
            unsplit(tree, sharded), tree)

    def batch_shapes(self, batch: PyTree) -> PyTree:
        """The global batch (every process's slice), split along its first axis."""
        processes = len(self.global_devices) // self.num_devices
        sharding = NamedSharding(self.mesh, P(AXIS))
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            (np.shape(x)[0] * processes, *np.shape(x)[1:]), leaf_dtype(x), sharding=sharding),
            batch)

    def put_batch(self, batch: PyTree) -> PyTree:
        """Split this process's slice (leaves `[B / processes, ...]`) over its devices.

        The result is the global `[B, ...]` array of the mesh, each process holding its rows.
        """
        sharding = NamedSharding(self.mesh, P(AXIS))

        def put(x):
            x = np.asarray(x)
            split_leading_axis(x, self.num_devices)  # only to check the size
            return jax.make_array_from_process_local_data(sharding, x)

        return jax.tree.map(put, batch)

    def compile(self, step: StepFn, donate_state: bool = True,
                traced: bool = False, sharded: PyTree = None) -> StepFn:
        """`jax.jit` of `jax.shard_map` with replicated state/outputs and a split batch.

        Replication is checked while compiling (`check_vma=True`); `traced` changes nothing.
        A split leaf of the state (`sharded`) is `P(batch)` in and out.
        """
        in_specs, out_specs = step_specs(sharded, donate_state)
        mapped = jax.shard_map(replicated_step(step, sharded), mesh=self.mesh,
                               in_specs=in_specs, out_specs=out_specs, check_vma=True)
        return jax.jit(mapped, donate_argnums=(0,) if donate_state else ())

    def compile_checked(self, step: StepFn, state: PyTree, batch: PyTree,
                        sharded: PyTree = None, donate_state: bool = True
                        ) -> tuple[StepFn, PyTree]:
        """`compile(step)` traced on the shapes it will run on: jit keeps that one trace."""
        compiled = self.compile(step, donate_state, sharded=sharded)
        return compiled, jax.eval_shape(compiled, self.placed_shapes(state, sharded),
                                        self.batch_shapes(batch))

    def compile_per_example(self, fn: StepFn) -> StepFn:
        """`jax.jit(jax.shard_map(...))` with the outputs split along `batch` like the input."""
        return jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), P(AXIS)),
                                     out_specs=P(AXIS), check_vma=True))
