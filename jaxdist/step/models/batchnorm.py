"""Cross-replica BatchNorm with the core's exact weighting.

Batch statistics are `psum(sum(w * x)) / psum(sum(w))` over all devices (and positions), so
padding rows (weight 0) never enter them and every device computes the same numbers; the
running statistics, updated from those, stay identical on every device.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdist.parallel.backend import AXIS


class CrossReplicaBatchNorm(nn.Module):
    """BatchNorm over the last axis, statistics shared across the `batch` device axis.

    Call as `bn(x, weight, train)`: `weight` has one entry per example (`x.shape[0]`).
    Running statistics live in the `batch_stats` collection. Outside a mapped step (at
    `init`) set `axis_name=None` or call with `train=False`.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = AXIS

    @nn.compact
    def __call__(self, x: jax.Array, weight: jax.Array, train: bool) -> jax.Array:
        """Normalize `x` with batch statistics (train) or running statistics (eval)."""
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,))
        if train and not self.is_initializing():
            mean, var = weighted_moments(x, weight, self.axis_name)
            running_mean.value = (self.momentum * running_mean.value
                                  + (1 - self.momentum) * mean)
            running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        else:
            mean, var = running_mean.value, running_var.value
        inverse = jax.lax.rsqrt(var + self.epsilon) * scale
        return ((x - mean.astype(x.dtype)) * inverse.astype(x.dtype)
                + bias.astype(x.dtype))


def weighted_moments(x: jax.Array, weight: jax.Array,
                     axis_name: str | None = AXIS) -> tuple[jax.Array, jax.Array]:
    """Mean and variance over all but the last axis, each example weighted, across devices."""
    xf = x.astype(jnp.float32)
    w = weight.astype(jnp.float32).reshape(weight.shape + (1,) * (x.ndim - 1))
    axes = tuple(range(x.ndim - 1))
    positions = jnp.prod(jnp.array(x.shape[1:-1], jnp.float32))  # per example
    count = jnp.sum(weight.astype(jnp.float32)) * positions
    first = jnp.sum(w * xf, axis=axes)
    second = jnp.sum(w * xf * xf, axis=axes)
    if axis_name is not None:
        count, first, second = jax.lax.psum((count, first, second), axis_name)
    count = jnp.maximum(count, 1.0)
    mean = first / count
    return mean, jnp.maximum(second / count - mean * mean, 0.0)
