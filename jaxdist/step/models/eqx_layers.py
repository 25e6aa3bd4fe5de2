"""equinox layers with the core's exact weighting: cross-replica BatchNorm.

`eqx.nn.BatchNorm` does not trace inside `jax.shard_map` with jax 0.10 and equinox 0.13.8:
in `mode="ema"` its `State.set` of the constant `first_time` flag is refused (the old
value carries the manual mesh's sharding, the constant does not), and in `mode="batch"`
its `pmean` over `(vmap axis, device axis)` is refused by shard_map's varying-axes check.
jaxdist traces every step under shard_map (the pmap backend too, to check replication), so
this layer takes its place: a whole batch at a time (no `vmap` axis), statistics summed
over all devices (`jaxdist.step.models.batchnorm.weighted_moments`), so padding rows
(weight 0) never enter them, and running statistics kept in an `eqx.nn.State`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxdist.parallel.backend import AXIS
from jaxdist.step.models.batchnorm import weighted_moments


class CrossReplicaBatchNorm(eqx.Module):
    """BatchNorm over the last axis of a batch `[b, ..., features]`, shared across devices.

    Build the model with `eqx.nn.make_with_state`; call as `x, state = bn(x, weight,
    state)`, `weight` one entry per example (`batch["weight"]`). In inference mode
    (`eqx.nn.inference_mode`, as jaxdist's evaluation uses) it normalizes with the running
    statistics and leaves the state unchanged.
    """

    scale: jax.Array
    bias: jax.Array
    running: eqx.nn.StateIndex
    momentum: float = eqx.field(static=True)
    epsilon: float = eqx.field(static=True)
    axis_name: str | None = eqx.field(static=True)
    inference: bool = False

    def __init__(self, features: int, *, momentum: float = 0.9, epsilon: float = 1e-5,
                 axis_name: str | None = AXIS, inference: bool = False):
        self.scale = jnp.ones(features)
        self.bias = jnp.zeros(features)
        self.running = eqx.nn.StateIndex((jnp.zeros(features), jnp.ones(features)))
        self.momentum, self.epsilon, self.axis_name = momentum, epsilon, axis_name
        self.inference = inference

    def __call__(self, x: jax.Array, weight: jax.Array,
                 state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        """Normalize `x` with batch statistics (training) or running statistics (inference)."""
        running_mean, running_var = state.get(self.running)
        if self.inference:
            mean, var = running_mean, running_var
        else:
            mean, var = weighted_moments(x, weight, self.axis_name)
            m = self.momentum
            state = state.set(self.running, (m * running_mean + (1 - m) * mean,
                                             m * running_var + (1 - m) * var))
        inverse = jax.lax.rsqrt(var + self.epsilon) * self.scale
        return ((x - mean.astype(x.dtype)) * inverse.astype(x.dtype)
                + self.bias.astype(x.dtype)), state
