"""Flax NNX layers with the core's exact weighting: cross-replica BatchNorm.

`nnx.BatchNorm(axis_name=...)` averages each device's (masked) mean over the devices, which
equals the global mean only when every device holds the same number of real rows. This one
sums over all devices first (`jaxdist.step.models.batchnorm.weighted_moments`), so padding
rows (weight 0) never enter the statistics and a device of padding only changes nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdist.parallel.backend import AXIS
from jaxdist.step.models.batchnorm import weighted_moments


class CrossReplicaBatchNorm(nnx.Module):
    """BatchNorm over the last axis, statistics shared across the `batch` device axis.

    Call as `bn(x, weight)`, `weight` one entry per example (`batch["weight"]`). Running
    statistics are `nnx.BatchStat` variables (the model state); `.train()` and `.eval()`
    switch `use_running_average` as for flax's own BatchNorm.
    """

    def __init__(self, features: int, *, momentum: float = 0.9, epsilon: float = 1e-5,
                 axis_name: str | None = AXIS, use_running_average: bool = False):
        self.scale = nnx.Param(jnp.ones(features))
        self.bias = nnx.Param(jnp.zeros(features))
        self.mean = nnx.BatchStat(jnp.zeros(features))
        self.var = nnx.BatchStat(jnp.ones(features))
        self.momentum, self.epsilon, self.axis_name = momentum, epsilon, axis_name
        self.use_running_average = use_running_average

    def __call__(self, x: jax.Array, weight: jax.Array) -> jax.Array:
        """Normalize `x` with batch statistics (training) or running statistics (eval)."""
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            mean, var = weighted_moments(x, weight, self.axis_name)
            m = self.momentum
            self.mean[...] = m * self.mean[...] + (1 - m) * mean
            self.var[...] = m * self.var[...] + (1 - m) * var
        inverse = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
        return ((x - mean.astype(x.dtype)) * inverse.astype(x.dtype)
                + self.bias[...].astype(x.dtype))
