"""Mixed precision lives in the model: it computes in bfloat16, everything else is float32.

`train.precision=bf16` does not cast anything at the step's edge. An experiment builds its
model for the compute dtype (flax modules take `dtype=compute_dtype(precision)` and keep
`param_dtype=float32`, as flax's ImageNet example does), and says so with
`Experiment(precision="bf16")`. The params and optimizer state stay float32, the gradients reach
them as float32, targets and labels are never cast, and losses, softmax and metrics are
computed in float32 (`jaxdist.step.losses` casts the model's output up first).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def compute_dtype(precision: str) -> Any:
    """The dtype a model's matmuls and convolutions run in for `train.precision`."""
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, not {precision!r}")
    return DTYPES[precision]


def cast_floats(tree: Any, dtype: Any) -> Any:
    """Every float32 leaf of `tree` as `dtype` (for plain-function models); others as they are.

    The cast is differentiable: gradients with respect to float32 params come back float32.
    """
    return jax.tree.map(lambda x: x.astype(dtype) if x.dtype == jnp.float32 else x, tree)
