"""The two ways of mapping one per-device step over the devices: pmap and shard_map.

Both backends take the very same per-device function `step(state, batch)`, in which `state`
is one device's copy of the replicated training state and `batch` is that device's slice of
the global batch, with collectives over the axis named `batch`.

- `PmapBackend` (`jaxdist/parallel/pmap.py`): `jax.pmap(step, axis_name="batch")`.
  Replicated values carry a leading axis of length `num_devices`; a global batch `[B, ...]`
  is reshaped to `[devices, B/devices, ...]`.
- `ShardMapBackend` (`jaxdist/parallel/shard_map.py`): `jax.jit(jax.shard_map(step, mesh,
  in_specs=(P(), P("batch"))))` on a 1-D mesh. Replicated values keep their own shape; a
  global batch `[B, ...]` is split along its first axis.

Every output of a step must be the same on every device (a `psum`/`pmean`, or computed from
such values only). shard_map checks this by type (`check_vma=True`): a value computed from
one device's rows alone is "varying", and jaxdist refuses it with one line that names it.
pmap does not track this, so the pmap backend runs the same check by tracing the step once
under shard_map (no compute) before its first call.

This module holds what both share: the `Backend` interface and the replication checks;
`jaxdist.parallel.backends.make_backend` builds one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdist.base.errors import UserError
from jaxdist.base.pytree import PyTree
from jaxdist.parallel.devices import global_devices

AXIS = "batch"

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
            f"BatchNorm, jaxdist.step.models.batchnorm.CrossReplicaBatchNorm)")


def replicated_step(step: StepFn, sharded: PyTree = None) -> StepFn:
    """`step`, refusing outputs that may differ across devices (checked while tracing).

    `sharded` (a tree of bools over the state) names the state's leaves that are split
    over the devices on purpose (`jaxdist.parallel.layout`): those are meant to differ.
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


def step_specs(sharded: PyTree, returns_state: bool) -> tuple[Any, Any]:
    """in_specs and out_specs of a step over (state, batch)."""
    if sharded is None:
        return (P(), P(AXIS)), P()
    specs = state_specs(sharded)
    return (specs, P(AXIS)), ((specs, P()) if returns_state else P())


def unsplit(tree: PyTree, sharded: PyTree) -> PyTree:
    """`sharded`, or (where it is None) a tree of False over `tree`: nothing split."""
    return jax.tree.map(lambda _: False, tree) if sharded is None else sharded


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

        def get(split, x):
            if not split:
                return self._copy(x, x.addressable_shards[0].data)
            shards = x.addressable_shards  # each holds one device's chunk, in either layout
            local = np.stack([np.asarray(s.data).reshape(-1) for s in shards])
            return all_rows(local, [self.global_devices.index(s.device) for s in shards])

        return jax.tree.map(get, sharded, tree)

    def split_sharding(self) -> NamedSharding:
        """How a split leaf lies as one global array: `[devices * chunk]` along `batch`."""
        return NamedSharding(self.mesh, P(AXIS))

    def split_to_global(self, x: jax.Array) -> jax.Array:
        """A placed split leaf as a global `[devices * chunk]` array, on the same devices.

        Each device keeps its own chunk: nothing moves between devices or processes. Where
        a backend lays split leaves out that way already (shard_map), it is `x` itself.
        """
        return x

    def split_from_global(self, x: jax.Array) -> jax.Array:
        """The inverse of `split_to_global`: a global `[devices * chunk]` as `place` lays it."""
        return x

    def placed_shapes(self, tree: PyTree, sharded: PyTree = None) -> PyTree:
        """What `place(tree, sharded)` would give, as shapes with shardings.

        Without `sharded`, what `replicate(tree)` would give.
        """
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

    def compile_checked(self, step: StepFn, state: PyTree, batch: PyTree,
                        sharded: PyTree = None, donate_state: bool = True
                        ) -> tuple[StepFn, PyTree]:
        """`compile(step)`, checked before anything runs: (the compiled step, its output shapes).

        The arguments are `trace`'s. Here the check is `trace` (under shard_map, which
        refuses an output that may differ across devices) and the compiled step traces
        again at its first call; a backend whose own program refuses such outputs checks by
        tracing that program, so the step is traced once.
        """
        shapes = self.trace(step, state, batch, sharded, returns_state=donate_state)
        return self.compile(step, donate_state, traced=True, sharded=sharded), shapes

    def checked_on_first_call(self, step: StepFn, mapped: StepFn, sharded: PyTree,
                              returns_state: bool) -> StepFn:
        """`mapped` (a compiled `step`), first tracing `step` under shard_map at its first call.

        For a backend whose mapping does not refuse outputs that differ across devices:
        the trace (no compute) does, on the shapes `global_shapes` gives of the arguments.
        """
        first_call = True

        def run(state: PyTree, batch: PyTree) -> PyTree:
            nonlocal first_call
            if first_call:
                self._trace_global(step, *self.global_shapes(state, batch, sharded), sharded,
                                   returns_state)
                first_call = False
            return mapped(state, batch)

        run.lower = mapped.lower  # type: ignore[attr-defined]
        return run

    def global_shapes(self, state: PyTree, batch: PyTree, sharded: PyTree) -> tuple[PyTree, PyTree]:
        """The shapes shard_map sees of placed arguments `(state, batch)` of this backend."""
        raise NotImplementedError

    def _trace_global(self, step: StepFn, state: PyTree, batch: PyTree,
                      sharded: PyTree = None, returns_state: bool = True) -> PyTree:
        in_specs, out_specs = step_specs(sharded, returns_state)
        mapped = jax.shard_map(replicated_step(step, sharded), mesh=self.mesh,
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
        return jax.tree.map(np.asarray, tree)

    def device_copies(self, tree: PyTree) -> list[PyTree]:
        """Return each device's own copy of a replicated tree, as numpy (for checks)."""
        return [jax.tree.map(lambda x, i=i: self._copy(x, x.addressable_shards[i].data), tree)
                for i in range(self.num_devices)]

    def first_copy(self, tree: PyTree) -> PyTree:
        """Return one device's copy of a replicated tree as numpy, copying nothing else."""
        return jax.tree.map(lambda x: self._copy(x, x.addressable_shards[0].data), tree)

    def _copy(self, x: jax.Array, shard: jax.Array) -> np.ndarray:
        """One device's `shard` of the replicated `x` as numpy, in a copy's shape."""
        return np.asarray(shard).reshape(self.first_shard(x)[1])

    def first_shard(self, x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
        """The first device's buffer of a replicated array (still there), and a copy's shape."""
        return x.addressable_shards[0].data, x.shape

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


def leaf_dtype(x: Any) -> np.dtype:
    """The dtype of an array, a shape struct or anything numpy can read."""
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


@jax.jit
def _concatenate(arrays: list[jax.Array]) -> jax.Array:
    # One compiled gather per window length; runs where the arrays live (the first device).
    return jax.numpy.concatenate([a.reshape(-1) for a in arrays])


def all_rows(local: np.ndarray, positions: list[int]) -> np.ndarray:
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
