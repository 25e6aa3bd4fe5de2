"""A ResNet-18-style network for 32x32 images, with cross-replica BatchNorm."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdist.step.models.batchnorm import CrossReplicaBatchNorm


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm, and a (projected) shortcut."""

    width: int
    stride: int
    axis_name: str | None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, weight: jax.Array, train: bool) -> jax.Array:
        """The block's output for `x` `[batch, h, w, c]`."""
        def norm(name):
            return CrossReplicaBatchNorm(axis_name=self.axis_name, name=name)

        y = nn.Conv(self.width, (3, 3), (self.stride, self.stride), use_bias=False,
                    dtype=self.dtype)(x)
        y = nn.relu(norm("bn1")(y, weight, train))
        y = nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(y)
        y = norm("bn2")(y, weight, train)
        if self.stride != 1 or x.shape[-1] != self.width:
            x = nn.Conv(self.width, (1, 1), (self.stride, self.stride), use_bias=False,
                        dtype=self.dtype)(x)
            x = norm("bn_shortcut")(x, weight, train)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """Stem conv, four stages of `blocks` BasicBlocks (widths w, 2w, 4w, 8w), pool, dense.

    With `width=64, blocks=2` this is ResNet-18's layout for CIFAR (3x3 stem, no max-pool).
    Every BatchNorm averages its statistics over all devices (axis `batch`), padding
    excluded; `axis_name=None` keeps them per device (and is needed at `init`). `dtype` is
    the compute dtype of the convolutions and the head; params stay float32.
    """

    outputs: int
    width: int = 64
    blocks: int = 2
    axis_name: str | None = "batch"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, weight: jax.Array, train: bool) -> jax.Array:
        """Logits for images `x` `[batch, 32, 32, 3]`, `weight` `[batch]`."""
        x = nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(x.astype(self.dtype))
        x = nn.relu(CrossReplicaBatchNorm(axis_name=self.axis_name, name="bn_stem")(
            x, weight, train))
        for stage in range(4):
            for block in range(self.blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(self.width * 2**stage, stride, self.axis_name, self.dtype,
                               name=f"stage{stage}_block{block}")(x, weight, train)
        return nn.Dense(self.outputs, dtype=self.dtype)(x.mean(axis=(1, 2)))
