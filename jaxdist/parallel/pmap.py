"""The pmap backend: `jax.pmap(step, axis_name="batch")` over the selected devices.

Replicated values carry a leading axis of length `num_devices` (device i holds row i); a
global batch `[B, ...]` is reshaped to `[devices, B/devices, ...]`. pmap does not track
which values differ across devices, so before the first call the step is traced once under
shard_map on the same devices (`Backend.trace`), which refuses such an output.
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
    split_leading_axis,
    unsplit,
)


class PmapBackend(Backend):
    """`jax.pmap` over the selected devices of all processes, fed per process."""

    name = "pmap"

    def _sharding(self) -> NamedSharding:
        # pmap takes this process's values, one row per local device.
        return NamedSharding(self.local_mesh, P(AXIS))

    def _copies(self, x: object) -> jax.Array:
        """A host leaf stacked once per device along a new leading axis, copy i on device i."""
        x = np.asarray(x)
        return jax.device_put(np.broadcast_to(x, (self.num_devices, *x.shape)), self._sharding())

    def replicate(self, tree: PyTree) -> PyTree:
        """Stack one copy per device along a new leading axis and place copy i on device i."""
        return jax.tree.map(self._copies, tree)

    def place(self, tree: PyTree, sharded: PyTree) -> PyTree:
        """A leading device axis: copies of a replicated leaf, this process's rows of a split."""
        rows = self._local_positions()

        def put(split, x):
            if not split:
                return self._copies(x)
            if isinstance(x, jax.Array):
                return self.split_from_global(x)
            return jax.device_put(np.asarray(x)[rows], self._sharding())

        return jax.tree.map(put, sharded, tree)

    def split_to_global(self, x: jax.Array) -> jax.Array:
        """Each device's row `[1, chunk]` becomes its piece of a global `[devices * chunk]`."""
        chunk = x.shape[1]
        pieces = [shard.data.reshape(chunk) for shard in x.addressable_shards]
        return jax.make_array_from_single_device_arrays(
            (len(self.global_devices) * chunk,), self.split_sharding(), pieces)

    def split_from_global(self, x: jax.Array) -> jax.Array:
        """Each device's piece of a global `[devices * chunk]` becomes its row `[1, chunk]`."""
        chunk = x.shape[0] // len(self.global_devices)
        pieces = {shard.device: shard.data for shard in x.addressable_shards}
        rows = [pieces[device].reshape(1, chunk) for device in self.devices]
        return jax.make_array_from_single_device_arrays((self.num_devices, chunk),
                                                        self._sharding(), rows)

    def _shape(self, shape: tuple[int, ...], x: object) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, leaf_dtype(x), sharding=self._sharding())

    def placed_shapes(self, tree: PyTree, sharded: PyTree = None) -> PyTree:
        """A leading device axis: this process's rows of a split leaf, copies of the others."""
        n = self.num_devices
        return jax.tree.map(lambda split, x: self._shape(
            (n, *np.shape(x)[1:]) if split else (n, *np.shape(x)), x), unsplit(tree, sharded),
            tree)

    def batch_shapes(self, batch: PyTree) -> PyTree:
        """`[devices, B / devices, ...]`, split over the devices."""
        n = self.num_devices
        return jax.tree.map(lambda x: self._shape((n, np.shape(x)[0] // n, *np.shape(x)[1:]), x),
                            batch)

    def put_batch(self, batch: PyTree) -> PyTree:
        """Reshape each `[B, ...]` leaf to `[devices, B / devices, ...]` and place it."""
        return jax.tree.map(lambda x: jax.device_put(
            split_leading_axis(np.asarray(x), self.num_devices), self._sharding()), batch)

    def compile(self, step: StepFn, donate_state: bool = True,
                traced: bool = False, sharded: PyTree = None) -> StepFn:
        """`jax.pmap` with axis name `batch`, donating the state buffers.

        Before the first call (unless `traced`), the step is traced once under shard_map on
        the same devices (no compute), which refuses an output that may differ across
        devices. A split leaf needs nothing else: under pmap, each device's row is its own.
        """
        mapped = jax.pmap(step, axis_name=AXIS, devices=self.global_devices,
                          donate_argnums=(0,) if donate_state else ())
        return mapped if traced else self.checked_on_first_call(step, mapped, sharded,
                                                                donate_state)

    def compile_per_example(self, fn: StepFn) -> StepFn:
        """`jax.pmap`: each device's outputs come back as row i of a leading device axis."""
        return jax.pmap(fn, axis_name=AXIS, devices=self.global_devices)

    def examples_to_host(self, tree: PyTree) -> PyTree:
        """Merge the device axis into the example axis."""
        return jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), tree)

    def global_shapes(self, state: PyTree, batch: PyTree, sharded: PyTree) -> tuple[PyTree, PyTree]:
        """What shard_map sees of pmap's arguments: one state copy, the global batch.

        A split leaf of the state, rows `[local devices, chunk]`, is seen whole:
        `[devices * chunk]`.
        """
        processes = len(self.global_devices) // self.num_devices

        def whole(x):
            return jax.ShapeDtypeStruct((x.shape[0] * x.shape[1] * processes, *x.shape[2:]),
                                        x.dtype)

        return (jax.tree.map(lambda split, x: whole(x) if split else jax.ShapeDtypeStruct(
            x.shape[1:], x.dtype), unsplit(state, sharded), state), jax.tree.map(whole, batch))

    def first_shard(self, x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
        """Device 0's row `[1, ...]` of the leading device axis; a copy is `x.shape[1:]`."""
        return x.addressable_shards[0].data, x.shape[1:]

