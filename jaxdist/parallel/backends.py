"""Building a backend by name: `pmap` (`jax.pmap`) or `shard_map` (`jax.jit(jax.shard_map)`)."""

from __future__ import annotations

from jaxdist.base.errors import UserError, choose_one_of
from jaxdist.parallel.backend import Backend
from jaxdist.parallel.devices import select_devices
from jaxdist.parallel.pmap import PmapBackend
from jaxdist.parallel.shard_map import ShardMapBackend

BACKENDS = ("pmap", "shard_map")


def make_backend(name: str, num_devices: int = 0) -> Backend:
    """Build the backend called `name` (`pmap` or `shard_map`) over `num_devices` devices."""
    if name not in BACKENDS:
        raise UserError(choose_one_of(f"parallel.backend={name}", BACKENDS))
    backend = PmapBackend if name == "pmap" else ShardMapBackend
    return backend(select_devices(num_devices))
