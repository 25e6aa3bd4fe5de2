"""The two ways of mapping one per-device step over the devices: pmap and shard_map.

Both backends take the very same per-device function `step(state, batch)`, in which `state`
is one device's copy of the replicated training state and `batch` is that device's slice of
the global batch, with collectives over the axis named `batch`.

- `PmapBackend`: `jax.pmap(step, axis_name="batch")`. Replicated values carry a leading axis
  of length `num_devices`; a global batch `[B, ...]` is reshaped to `[devices, B/devices, ...]`.
- `ShardMapBackend`: `jax.jit(jax.shard_map(step, mesh, in_specs=(P(), P("batch"))))` on a 1-D
  mesh. Replicated values keep their own shape; a global batch `[B, ...]` is split along its
  first axis.

Every output of a step must be the same on every device (a `psum`/`pmean`, or computed from
such values only). shard_map checks this by type (`check_vma=True`): a value computed from
one device's rows alone is "varying", and jaxdist refuses it with one line that names it.
pmap does not track this, so the pmap backend runs the same check by tracing the step once
under shard_map (no compute) before its first call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdist.devices import global_devices, select_devices
from jaxdist.errors import UserError

AXIS = "batch"

PyTree = Any
StepFn = Callable[[PyTree, PyTree], PyTree]


def varying_axes(x: Any) -> frozenset:
    """The mesh axes along which the traced value `x` may differ (empty outside shard_map)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)  # jax < 0.10
    if vma is None:
        mat = getattr(aval, "mat", None)  # jax >= 0.10: the manual axis type
        vma = mat.varying if mat is not None else frozenset()
    return frozenset(vma)


def mark_varying(tree: PyTree) -> PyTree:
    """Mark every leaf of `tree` as (possibly) differing across the devices of axis `batch`.

    Inside shard_map, differentiating with respect to params so marked gives each device's
    own gradient, rather than one that JAX has already summed over devices. Leaves already
    varying are kept; under pmap (which does not track this) it changes nothing.
    """
    cast = getattr(jax.lax, "pcast", None)

    def mark(x):
        if AXIS in varying_axes(x):
            return x
        if cast is not None:
            return cast(x, AXIS, to="varying")
        return jax.lax.pvary(x, AXIS)  # jax < 0.10

    return jax.tree.map(mark, tree)


def require_same_on_every_device(tree: PyTree, name: str) -> None:
    """Refuse (one line) a traced value that may differ across devices, naming its leaves."""
    varying = [jax.tree_util.keystr(path) for path, leaf in
               jax.tree_util.tree_flatten_with_path(tree)[0] if AXIS in varying_axes(leaf)]
    if varying:
        listed = ", ".join(f"{name}{path}" for path in varying[:3])
        more = f" and {len(varying) - 3} more" if len(varying) > 3 else ""
        raise UserError(
            f"{listed}{more} differs across devices: it is computed from one device's rows "
            f"only, so a checkpoint would keep device 0's copy and a resumed run would differ; "
            f"combine it over devices with jax.lax.psum/pmean over axis '{AXIS}' (for "
            f"BatchNorm, jaxdist.models.batchnorm.CrossReplicaBatchNorm)")


def _replicated_step(step: StepFn, sharded: PyTree = None) -> StepFn:
    """`step`, refusing outputs that may differ across devices (checked while tracing).

    `sharded` (a tree of bools over the state) names the state's leaves that are split
    over the devices on purpose (`jaxdist.sharding`): those are meant to differ.
    """

    def checked(state, batch):
        outputs = step(state, batch)
        if isinstance(outputs, tuple) and len(outputs) == 2:  # a train step
            new_state = outputs[0]
            if sharded is not None:
                new_state = jax.tree.map(lambda split, x: None if split else x, sharded,
                                         new_state)
            require_same_on_every_device(new_state, "state")
            require_same_on_every_device(outputs[1], "metrics")
        else:
            require_same_on_every_device(outputs, "output")
        return outputs

    return checked


def state_specs(sharded: PyTree) -> PyTree:
    """shard_map's specs of a state: `P(batch)` for a split leaf, `P()` for a replicated one."""
    return jax.tree.map(lambda split: P(AXIS) if split else P(), sharded)


def _specs(sharded: PyTree, returns_state: bool) -> tuple[Any, Any]:
    """in_specs and out_specs of a step over (state, batch)."""
    if sharded is None:
        return (P(), P(AXIS)), P()
    specs = state_specs(sharded)
    return (specs, P(AXIS)), ((specs, P()) if returns_state else P())


def split_leading_axis(x: np.ndarray, parts: int) -> np.ndarray:
    """Reshape `[B, ...]` to `[parts, B / parts, ...]`."""
    if x.shape[0] % parts:
        raise ValueError(f"a batch of {x.shape[0]} rows cannot be split over {parts} devices")
    return x.reshape(parts, x.shape[0] // parts, *x.shape[1:])


class Backend:
    """Places state and batches on devices and compiles per-device steps for them."""

    name: str

    def __init__(self, devices: Sequence[jax.Device]):
        self.devices = list(devices)  # this process's devices
        self.global_devices = global_devices(len(self.devices))
        self.local_mesh = Mesh(np.array(self.devices), (AXIS,))
        self.mesh = Mesh(np.array(self.global_devices), (AXIS,))

    @property
    def num_devices(self) -> int:
        """How many devices of this process share its slice of a global batch."""
        return len(self.devices)

    def replicate(self, tree: PyTree) -> PyTree:
        """Put one copy of every leaf of `tree` on each device."""
        raise NotImplementedError

    def put_batch(self, batch: PyTree) -> PyTree:
        """Split a host batch (leaves `[B, ...]`) over the devices, `B / devices` rows each."""
        raise NotImplementedError

    def place(self, tree: PyTree, sharded: PyTree) -> PyTree:
        """Put `tree` on the devices: a leaf marked in `sharded` is split, the others copied.

        A split leaf comes as host `[devices, chunk]` over all devices of all processes;
        device i gets row i (its own chunk). It may also come as the global array
        `split_to_global` makes (as restored from a checkpoint), and stays where it is.
        The others are replicated.
        """
        raise NotImplementedError

    def to_host(self, tree: PyTree, sharded: PyTree) -> PyTree:
        """The inverse of `place`: split leaves as numpy `[devices, chunk]`, the others one copy.

        In a multi-process run every process must call it (the rows of other processes'
        devices come by an all-gather between processes).
        """
        raise NotImplementedError

    def split_sharding(self) -> NamedSharding:
        """How a split leaf lies as one global array: `[devices * chunk]` along `batch`."""
        return NamedSharding(self.mesh, P(AXIS))

    def split_to_global(self, x: jax.Array) -> jax.Array:
        """A placed split leaf as a global `[devices * chunk]` array, on the same devices.

        Each device keeps its own chunk: nothing moves between devices or processes.
        """
        raise NotImplementedError

    def split_from_global(self, x: jax.Array) -> jax.Array:
        """The inverse of `split_to_global`: a global `[devices * chunk]` as `place` lays it."""
        raise NotImplementedError

    def replicated_shapes(self, tree: PyTree) -> PyTree:
        """What `replicate(tree)` would give, as shapes with shardings (nothing is placed)."""
        raise NotImplementedError

    def placed_shapes(self, tree: PyTree, sharded: PyTree) -> PyTree:
        """What `place(tree, sharded)` would give, as shapes with shardings."""
        raise NotImplementedError

    def batch_shapes(self, batch: PyTree) -> PyTree:
        """What `put_batch(batch)` would give, as shapes with shardings."""
        raise NotImplementedError

    def compile(self, step: StepFn, donate_state: bool = True,
                traced: bool = False, sharded: PyTree = None) -> StepFn:
        """Map a per-device `step(state, batch) -> outputs` over the devices.

        `state` is replicated, `batch` is split, and every output must be replicated (the
        result of a `psum`/`pmean` or computed from replicated values only; one that is
        not is refused). With `donate_state`, the state's buffers are reused for the
        outputs. `traced` says `trace` already checked this step (pmap then skips its own
        check). `sharded` (a tree of bools over the state) marks the state's leaves that
        are split over the devices (as `place` puts them); a train step (`donate_state`)
        returns its new state in the same layout.
        """
        raise NotImplementedError

    def trace(self, step: StepFn, state: PyTree, batch: PyTree,
              sharded: PyTree = None, returns_state: bool = True) -> PyTree:
        """The shapes of `step`'s outputs on these devices, traced without computing.

        `state` is one host copy of the state (a split leaf, marked in `sharded`, given as
        `[devices, chunk]`) and `batch` this process's host batch. The errors a step
        raises while tracing (an output that differs across devices, a loss of the wrong
        shape) come here, before anything runs. `returns_state`: `step` is a train step,
        returning `(state, metrics)` (only needed with `sharded`).
        """
        processes = len(self.global_devices) // self.num_devices
        state_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        if sharded is not None:
            state_shapes = jax.tree.map(
                lambda split, x: jax.ShapeDtypeStruct((x.shape[0] * x.shape[1],), x.dtype)
                if split else x, sharded, state_shapes)
        batch_shapes = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((x.shape[0] * processes, *x.shape[1:]), x.dtype),
            batch)
        return self._trace_global(step, state_shapes, batch_shapes, sharded, returns_state)

    def _trace_global(self, step: StepFn, state: PyTree, batch: PyTree,
                      sharded: PyTree = None, returns_state: bool = True) -> PyTree:
        in_specs, out_specs = _specs(sharded, returns_state)
        mapped = jax.shard_map(_replicated_step(step, sharded), mesh=self.mesh,
                               in_specs=in_specs, out_specs=out_specs, check_vma=True)
        return jax.eval_shape(mapped, state, batch)

    def _local_positions(self) -> list[int]:
        """The positions of this process's devices on the global `batch` axis."""
        return [self.global_devices.index(d) for d in self.devices]

    def compile_per_example(self, fn: StepFn) -> StepFn:
        """Map `fn(replicated, batch) -> outputs` whose outputs have a row per example.

        Unlike `compile`, the outputs stay split over the devices as the batch was;
        `examples_to_host` brings them back in the batch's order (one process).
        """
        raise NotImplementedError

    def examples_to_host(self, tree: PyTree) -> PyTree:
        """The per-example outputs of `compile_per_example` as numpy `[B, ...]`."""
        raise NotImplementedError

    def device_copies(self, tree: PyTree) -> list[PyTree]:
        """Return each device's own copy of a replicated tree, as numpy (for checks)."""
        raise NotImplementedError

    def first_copy(self, tree: PyTree) -> PyTree:
        """Return one device's copy of a replicated tree as numpy, copying nothing else."""
        raise NotImplementedError

    def first_shard(self, x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
        """The first device's buffer of a replicated array (still there), and a copy's shape."""
        raise NotImplementedError

    def small_values_to_host(self, tree: PyTree) -> PyTree:
        """One device's copy of a tree of small replicated values, in one transfer per dtype.

        The first device's copies are concatenated on that device and copied to the host
        at once: reading a log window of steps x metrics scalars one by one would cost a
        device-to-host round trip each. Exact: concatenation only moves bytes.
        """
        leaves, treedef = jax.tree.flatten(tree)
        firsts = [self.first_shard(leaf) for leaf in leaves]
        shards, shapes = [s for s, _ in firsts], [shape for _, shape in firsts]
        by_dtype: dict[Any, list[int]] = {}
        for index, shard in enumerate(shards):
            by_dtype.setdefault(shard.dtype, []).append(index)
        host: list[Any] = [None] * len(leaves)
        for indices in by_dtype.values():
            flat = np.asarray(_concatenate([shards[i] for i in indices]))
            offset = 0
            for i in indices:
                size = shards[i].size
                host[i] = flat[offset:offset + size].reshape(shapes[i])
                offset += size
        return jax.tree.unflatten(treedef, host)


class PmapBackend(Backend):
    """`jax.pmap` over the selected devices of all processes, fed per process."""

    name = "pmap"

    def _sharding(self) -> NamedSharding:
        # pmap takes this process's values, one row per local device.
        return NamedSharding(self.local_mesh, P(AXIS))

    def replicate(self, tree: PyTree) -> PyTree:
        """Stack one copy per device along a new leading axis and place copy i on device i."""
        n = self.num_devices
        sharding = self._sharding()

        def put(x):
            x = np.asarray(x)
            return jax.device_put(np.broadcast_to(x, (n, *x.shape)), sharding)

        return jax.tree.map(put, tree)

    def place(self, tree: PyTree, sharded: PyTree) -> PyTree:
        """A leading device axis: copies of a replicated leaf, this process's rows of a split."""
        n, sharding, rows = self.num_devices, self._sharding(), self._local_positions()

        def put(split, x):
            if split and isinstance(x, jax.Array):
                return self.split_from_global(x)
            x = np.asarray(x)
            return jax.device_put(x[rows] if split else np.broadcast_to(x, (n, *x.shape)),
                                  sharding)

        return jax.tree.map(put, sharded, tree)

    def to_host(self, tree: PyTree, sharded: PyTree) -> PyTree:
        """Every device's row of a split leaf (all processes'), the first copy of the others."""

        def get(split, x):
            if not split:
                return np.asarray(x.addressable_shards[0].data)[0]
            local = np.stack([np.asarray(s.data)[0] for s in
                              sorted(x.addressable_shards, key=lambda s: s.index[0].start)])
            return _all_rows(local, self._local_positions())

        return jax.tree.map(get, sharded, tree)

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

    def replicated_shapes(self, tree: PyTree) -> PyTree:
        """A leading device axis, split over the devices."""
        n, sharding = self.num_devices, self._sharding()
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((n, *np.shape(x)), _dtype(x),
                                                           sharding=sharding), tree)

    def placed_shapes(self, tree: PyTree, sharded: PyTree) -> PyTree:
        """A leading device axis: this process's rows of a split leaf, copies of the others."""
        n, sharding = self.num_devices, self._sharding()
        return jax.tree.map(lambda split, x: jax.ShapeDtypeStruct(
            (n, *np.shape(x)[1:]) if split else (n, *np.shape(x)), _dtype(x),
            sharding=sharding), sharded, tree)

    def batch_shapes(self, batch: PyTree) -> PyTree:
        """`[devices, B / devices, ...]`, split over the devices."""
        n, sharding = self.num_devices, self._sharding()
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            (n, np.shape(x)[0] // n, *np.shape(x)[1:]), _dtype(x), sharding=sharding), batch)

    def put_batch(self, batch: PyTree) -> PyTree:
        """Reshape each `[B, ...]` leaf to `[devices, B / devices, ...]` and place it."""
        n = self.num_devices
        sharding = self._sharding()

        return jax.tree.map(
            lambda x: jax.device_put(split_leading_axis(np.asarray(x), n), sharding), batch)

    def compile(self, step: StepFn, donate_state: bool = True,
                traced: bool = False, sharded: PyTree = None) -> StepFn:
        """`jax.pmap` with axis name `batch`, donating the state buffers.

        Before the first call (unless `traced`), the step is traced once under shard_map on
        the same devices (no compute), which refuses an output that may differ across
        devices. A split leaf needs nothing else: under pmap, each device's row is its own.
        """
        mapped = jax.pmap(step, axis_name=AXIS, devices=self.global_devices,
                          donate_argnums=(0,) if donate_state else ())
        if traced:
            return mapped
        first_call = True

        def run(state: PyTree, batch: PyTree) -> PyTree:
            nonlocal first_call
            if first_call:
                processes = len(self.global_devices) // self.num_devices
                self._trace_global(step, *_per_device_shapes(state, batch, processes,
                                                             sharded), sharded, donate_state)
                first_call = False
            return mapped(state, batch)

        run.lower = mapped.lower  # type: ignore[attr-defined]
        return run

    def compile_per_example(self, fn: StepFn) -> StepFn:
        """`jax.pmap`: each device's outputs come back as row i of a leading device axis."""
        return jax.pmap(fn, axis_name=AXIS, devices=self.global_devices)

    def examples_to_host(self, tree: PyTree) -> PyTree:
        """Merge the device axis into the example axis."""
        return jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), tree)

    def device_copies(self, tree: PyTree) -> list[PyTree]:
        """Row i of every leaf is device i's copy."""
        host = jax.device_get(tree)
        return [jax.tree.map(lambda x, i=i: np.asarray(x)[i], host)
                for i in range(self.num_devices)]

    def first_copy(self, tree: PyTree) -> PyTree:
        """Read only the first device's shard of every leaf."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)

    def first_shard(self, x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
        """Device 0's row `[1, ...]` of the leading device axis; a copy is `x.shape[1:]`."""
        return x.addressable_shards[0].data, x.shape[1:]


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

    def to_host(self, tree: PyTree, sharded: PyTree) -> PyTree:
        """A split leaf read back as `[devices, chunk]` (from every process), others one copy."""
        devices = len(self.global_devices)

        def get(split, x):
            if not split:
                return np.asarray(x.addressable_shards[0].data)
            if x.is_fully_addressable:
                return np.asarray(x).reshape(devices, -1)
            shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start)
            local = np.stack([np.asarray(s.data) for s in shards])
            positions = [s.index[0].start // local.shape[1] for s in shards]
            return _all_rows(local, positions)

        return jax.tree.map(get, sharded, tree)

    def split_to_global(self, x: jax.Array) -> jax.Array:
        """A split leaf already is the global `[devices * chunk]` array."""
        return x

    def split_from_global(self, x: jax.Array) -> jax.Array:
        """A split leaf already is the global `[devices * chunk]` array."""
        return x

    def replicated_shapes(self, tree: PyTree) -> PyTree:
        """The leaves' own shapes, replicated over the mesh."""
        sharding = NamedSharding(self.mesh, P())
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), _dtype(x),
                                                           sharding=sharding), tree)

    def placed_shapes(self, tree: PyTree, sharded: PyTree) -> PyTree:
        """A split leaf `[devices, chunk]` as `[devices * chunk]` along `batch`; others whole."""
        split_sharding = NamedSharding(self.mesh, P(AXIS))
        replicated = NamedSharding(self.mesh, P())
        return jax.tree.map(lambda split, x: jax.ShapeDtypeStruct(
            (int(np.prod(np.shape(x))),), _dtype(x), sharding=split_sharding) if split else
            jax.ShapeDtypeStruct(np.shape(x), _dtype(x), sharding=replicated), sharded, tree)

    def batch_shapes(self, batch: PyTree) -> PyTree:
        """The global batch (every process's slice), split along its first axis."""
        processes = len(self.global_devices) // self.num_devices
        sharding = NamedSharding(self.mesh, P(AXIS))
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            (np.shape(x)[0] * processes, *np.shape(x)[1:]), _dtype(x), sharding=sharding),
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
        in_specs, out_specs = _specs(sharded, donate_state)
        mapped = jax.shard_map(_replicated_step(step, sharded), mesh=self.mesh,
                               in_specs=in_specs, out_specs=out_specs, check_vma=True)
        return jax.jit(mapped, donate_argnums=(0,) if donate_state else ())

    def compile_per_example(self, fn: StepFn) -> StepFn:
        """`jax.jit(jax.shard_map(...))` with the outputs split along `batch` like the input."""
        return jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), P(AXIS)),
                                     out_specs=P(AXIS), check_vma=True))

    def examples_to_host(self, tree: PyTree) -> PyTree:
        """The global arrays, read whole."""
        return jax.tree.map(np.asarray, tree)

    def device_copies(self, tree: PyTree) -> list[PyTree]:
        """Shard i of every replicated leaf is device i's copy."""
        return [jax.tree.map(lambda x, i=i: np.asarray(x.addressable_shards[i].data), tree)
                for i in range(self.num_devices)]

    def first_copy(self, tree: PyTree) -> PyTree:
        """Read only the first device's copy of every leaf."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), tree)

    def first_shard(self, x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
        """The first device's (whole) copy."""
        return x.addressable_shards[0].data, x.shape


def _dtype(x: Any) -> np.dtype:
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


@jax.jit
def _concatenate(arrays: list[jax.Array]) -> jax.Array:
    # One compiled gather per window length; runs where the arrays live (the first device).
    return jax.numpy.concatenate([a.reshape(-1) for a in arrays])


def _per_device_shapes(state: PyTree, batch: PyTree, processes: int,
                       sharded: PyTree = None) -> tuple[PyTree, PyTree]:
    """The shapes shard_map sees for pmap's arguments: one state copy, the whole batch.

    A split leaf of the state (`sharded`), rows `[local devices, chunk]`, is seen whole:
    `[devices * chunk]`.
    """
    def one_copy(x):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)

    def whole(x):
        return jax.ShapeDtypeStruct((x.shape[0] * x.shape[1] * processes, *x.shape[2:]),
                                    x.dtype)

    if sharded is None:
        return jax.tree.map(one_copy, state), jax.tree.map(whole, batch)
    return (jax.tree.map(lambda split, x: whole(x) if split else one_copy(x), sharded, state),
            jax.tree.map(whole, batch))


def _all_rows(local: np.ndarray, positions: list[int]) -> np.ndarray:
    """Every process's rows `[devices, ...]` of a split leaf, from this process's `local`.

    `positions` are the global rows of `local`'s rows. With one process that is all of
    them; otherwise the processes exchange their rows (every process must call this).
    """
    if jax.process_count() == 1:
        out = np.empty_like(local)
        out[positions] = local
        return out
    from jax.experimental import multihost_utils

    rows = np.asarray(multihost_utils.process_allgather(local))
    where = np.asarray(multihost_utils.process_allgather(np.asarray(positions)))
    out = np.empty((rows.shape[0] * rows.shape[1], *rows.shape[2:]), rows.dtype)
    out[where.reshape(-1)] = rows.reshape(-1, *rows.shape[2:])
    return out


BACKENDS: dict[str, type[Backend]] = {"pmap": PmapBackend, "shard_map": ShardMapBackend}


def make_backend(name: str, num_devices: int = 0) -> Backend:
    """Build the backend called `name` (`pmap` or `shard_map`) over `num_devices` devices."""
    if name not in BACKENDS:
        raise UserError(f"parallel.backend={name} is unknown; choose one of: "
                        f"{', '.join(BACKENDS)}")
    return BACKENDS[name](select_devices(num_devices))
