"""A multi-layer perceptron with dropout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    """Dense-ReLU-Dropout blocks, then a linear output layer."""

    hidden: Sequence[int]
    outputs: int
    dropout: float = 0.0
    dtype: Any = jnp.float32  # compute dtype; params stay float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Logits for `x` `[batch, ...]` (flattened); dropout only when `train`."""
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.outputs, dtype=self.dtype)(x)
