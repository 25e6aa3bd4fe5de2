"""A small convolutional network for small images (e.g. 8x8 digits)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class SmallCNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool, a dense layer with dropout, the logits."""

    outputs: int
    channels: tuple[int, int] = (16, 32)
    dense: int = 128
    dropout: float = 0.2
    dtype: Any = jnp.float32  # compute dtype; params stay float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Logits for images `x` `[batch, height, width]` or `[batch, height, width, c]`."""
        if x.ndim == 3:
            x = x[..., None]
        for width in self.channels:
            x = nn.relu(nn.Conv(width, (3, 3), dtype=self.dtype)(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(self.dense, dtype=self.dtype)(x.reshape(x.shape[0], -1)))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.outputs, dtype=self.dtype)(x)
