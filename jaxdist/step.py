"""The per-device train and eval steps, built from a loss function and an optax transform.

A loss function has the signature `loss_fn(params, batch, rng) -> (losses, aux)`, where
`losses` has one entry per example of this device's slice (shape `[b]`) and `aux` is a dict
of per-example metrics (each shape `[b]`). Every batch carries `batch["weight"]` (shape
`[b]`): 1 for a real example, 0 for padding.

Gradient reduction (`grad_reduce`):
- `"mean"` (default): each device differentiates its weighted *sum* of losses and the update
  uses `psum(grad of weighted sums) / psum(weights)`, the exact gradient of the global
  weighted mean loss, whatever the padding and however many devices.
- `"sum"`: the seed's literal rule `theta <- theta - eta * sum_i grad J_i`, with `J_i` device
  i's own mean loss. When every device holds the same number of real examples this is
  `num_devices` times the `"mean"` gradient, so for SGD it equals `"mean"` with the learning
  rate multiplied by the device count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxdist.parallel import AXIS

PyTree = Any
Batch = dict[str, jax.Array]
LossFn = Callable[[PyTree, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
EvalFn = Callable[[PyTree, Batch], tuple[jax.Array, dict[str, jax.Array]]]

# Keys of the summed metrics that every step returns besides the loss function's aux.
LOSS_SUM = "loss"
WEIGHT_SUM = "weight"
NONFINITE = "nonfinite_steps"  # 1 for a step skipped because its loss or gradient was not finite


class TrainState(NamedTuple):
    """Everything that changes from step to step. One copy lives on each device."""

    step: jax.Array  # int32 scalar: how many updates have been applied
    params: PyTree
    opt_state: PyTree
    rng: jax.Array  # raw uint32 key data of the run's root key

    @classmethod
    def create(cls, params: PyTree, tx: optax.GradientTransformation,
               rng: jax.Array) -> TrainState:
        """Start a run at step 0 from initial `params` and a root key."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
                   else rng)


def device_rng(root: jax.Array, step: jax.Array) -> jax.Array:
    """The key for this device at this step: fold in the step, then the device's index.

    Call inside a mapped step. Dropout masks differ across devices and steps, and a run with
    the same root key repeats exactly.
    """
    step_key = jax.random.fold_in(jax.random.wrap_key_data(root), step)
    return jax.random.fold_in(step_key, jax.lax.axis_index(AXIS))


def _weighted_sums(losses: jax.Array, aux: dict[str, jax.Array],
                   weights: jax.Array) -> dict[str, jax.Array]:
    if losses.shape != weights.shape:
        raise ValueError(
            f"loss_fn must return one loss per example, shape {weights.shape}; got shape "
            f"{losses.shape}. Return the per-example losses, not their mean.")
    sums = {LOSS_SUM: jnp.sum(losses * weights), WEIGHT_SUM: jnp.sum(weights)}
    for name, values in aux.items():
        if values.shape != weights.shape:
            raise ValueError(f"aux[{name!r}] must have one value per example, shape "
                             f"{weights.shape}; got shape {values.shape}")
        sums[name] = jnp.sum(values * weights)
    return sums


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    grad_reduce: Literal["mean", "sum"] = "mean", skip_nonfinite: bool = True
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Build the per-device step `(state, batch) -> (state, summed_metrics)`.

    The returned metrics are sums over all devices (`loss`, `weight` and each aux name);
    divide by `weight` for the exact mean. Map the step with a backend from
    `jaxdist.parallel`.

    With `skip_nonfinite`, a step whose global loss or gradient holds a NaN or inf changes
    neither the params nor the optimizer state, on every device alike (the test is made on
    the all-reduced values, which every device shares); its metric sums are zeroed and
    `nonfinite_steps` is 1.
    """
    if grad_reduce not in ("mean", "sum"):
        raise ValueError(f"grad_reduce must be 'mean' or 'sum', not {grad_reduce!r}")

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        weights = batch["weight"]
        rng = device_rng(state.rng, state.step)

        def weighted_loss_sum(params):
            losses, aux = loss_fn(params, batch, rng)
            sums = _weighted_sums(losses, aux, weights)
            return sums[LOSS_SUM], sums

        grad_sums, local = jax.grad(weighted_loss_sum, has_aux=True)(state.params)
        # Two separate psums: one all-reduce mixing the gradients with the scalar metrics
        # measured about 7% slower on 8 CPU devices (scripts/bench_step.py).
        totals = jax.lax.psum(local, AXIS)
        if grad_reduce == "mean":
            grads = jax.tree.map(lambda g: g / _nonzero(totals[WEIGHT_SUM]),
                                 jax.lax.psum(grad_sums, AXIS))
        else:
            grads = jax.lax.psum(
                jax.tree.map(lambda g: g / _nonzero(local[WEIGHT_SUM]), grad_sums), AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if skip_nonfinite:
            finite = _all_finite((totals[LOSS_SUM], grads))
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                             (params, opt_state),
                                             (state.params, state.opt_state))
            totals = {name: jnp.where(finite, value, 0.0) for name, value in totals.items()}
            totals[NONFINITE] = 1.0 - finite.astype(jnp.float32)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               rng=state.rng)
        return new_state, totals

    return train_step


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def make_eval_step(eval_fn: EvalFn) -> Callable[[PyTree, Batch], dict[str, jax.Array]]:
    """Build the per-device step `(params, batch) -> summed_metrics`.

    `eval_fn(params, batch) -> (losses, aux)` is deterministic (no dropout). Padding rows
    weigh 0, so summing over an epoch of padded batches counts every example exactly once.
    """

    def eval_step(params: PyTree, batch: Batch) -> dict[str, jax.Array]:
        losses, aux = eval_fn(params, batch)
        return jax.lax.psum(_weighted_sums(losses, aux, batch["weight"]), AXIS)

    return eval_step


def _nonzero(total: jax.Array) -> jax.Array:
    # A device (or a whole batch) of padding only has weight 0 and gradient sum 0: divide by 1.
    return jnp.where(total > 0, total, 1.0)
