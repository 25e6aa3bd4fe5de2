"""The per-device train and eval steps, built from a loss function and an optax transform.

A loss function has the signature `loss_fn(params, batch, rng) -> (losses, aux)`, where
`losses` has one entry per example of this device's slice (shape `[b]`) and `aux` is a dict
of per-example metrics (each shape `[b]`). Every batch carries `batch["weight"]` (shape
`[b]`): 1 for a real example, 0 for padding. A model with state that is not trained by
gradients (BatchNorm statistics) uses the stateful form
`loss_fn(params, model_state, batch, rng) -> (losses, aux, new_model_state)`.

Options of the train step: `grad_accum=k` runs each device's batch as k micro-batches and
makes one update from the sum of their gradients, which equals one step on the whole batch.
Precision lives in the model (see `jaxdist.step.precision`): the step casts nothing, and the
losses and metrics it sums are float32 whatever the model computed them in.

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
from dataclasses import dataclass
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxdist.base.errors import UserError
from jaxdist.base.pytree import PyTree
from jaxdist.parallel.backend import AXIS, mark_varying, require_same_on_every_device
from jaxdist.parallel.strategies import Strategy
from jaxdist.step.leaves import check_same_structure
from jaxdist.step.norms import NORM_KEYS, change_square_parts, global_norms, square_parts

Batch = dict[str, jax.Array]
LossFn = Callable[[PyTree, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
EvalFn = Callable[[PyTree, Batch], tuple[jax.Array, dict[str, jax.Array]]]
StatefulLossFn = Callable[[PyTree, PyTree, Batch, jax.Array],
                          tuple[jax.Array, dict[str, jax.Array], PyTree]]
StatefulEvalFn = Callable[[PyTree, PyTree, Batch], tuple[jax.Array, dict[str, jax.Array]]]

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
    model_state: PyTree = None  # e.g. BatchNorm statistics; None for a stateless model

    @classmethod
    def create(cls, params: PyTree, tx: optax.GradientTransformation, rng: jax.Array,
               model_state: PyTree = None) -> TrainState:
        """Start a run at step 0 from initial `params` (and model state) and a root key."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
                   else rng, model_state=model_state)


def stateful(loss_fn: LossFn) -> StatefulLossFn:
    """The stateful form of a stateless loss function (its model state stays None)."""

    def with_state(params, model_state, batch, rng):
        losses, aux = loss_fn(params, batch, rng)
        return losses, aux, model_state

    return with_state


def stateful_eval(eval_fn: EvalFn) -> StatefulEvalFn:
    """The stateful form of a stateless evaluation function."""
    return lambda params, model_state, batch: eval_fn(params, batch)


def device_rng(root: jax.Array, step: jax.Array) -> jax.Array:
    """The key for this device at this step: fold in the step, then the device's index.

    Call inside a mapped step. Dropout masks differ across devices and steps, and a run with
    the same root key repeats exactly.
    """
    step_key = jax.random.fold_in(jax.random.wrap_key_data(root), step)
    return jax.random.fold_in(step_key, jax.lax.axis_index(AXIS))


def _weighted_sums(losses: jax.Array, aux: dict[str, jax.Array],
                   weights: jax.Array) -> dict[str, jax.Array]:
    """Float32 sums of the per-example values over this device's real rows."""
    if losses.shape != weights.shape:
        raise UserError(
            f"loss_fn must return one loss per example, shape {weights.shape}; got shape "
            f"{losses.shape}. Return the per-example losses, not their mean.")
    real = weights > 0

    def total(values: jax.Array) -> jax.Array:
        # A select, not a product: a padding row's value never enters (NaN * 0 is NaN).
        return jnp.sum(jnp.where(real, values.astype(jnp.float32) * weights, 0.0))

    sums = {LOSS_SUM: total(losses), WEIGHT_SUM: jnp.sum(weights)}
    for name, values in aux.items():
        if values.shape != weights.shape:
            raise UserError(f"aux[{name!r}] must have one value per example, shape "
                            f"{weights.shape}; got shape {values.shape}")
        sums[name] = total(values)
    return sums


@dataclass(frozen=True)
class StepOptions:
    """How a train step treats its batch and its gradients.

    The config's `train.*` and `parallel.grad_reduce`, and whether the model gathers its
    own split parameters.
    """

    grad_reduce: Literal["mean", "sum"] = "mean"
    skip_nonfinite: bool = True
    skip_with: Literal["cond", "where"] = "cond"
    grad_accum: int = 1
    gathers_params: bool = False  # `Experiment.gathers_params`
    # Report grad_norm, param_norm and update_norm after every `norms_every`-th step (0:
    # never). Not after a run's last step: the program must not depend on `train.steps`,
    # which a resume may raise (the compilation cache would miss).
    norms_every: int = 0

    def __post_init__(self) -> None:
        if self.grad_reduce not in ("mean", "sum"):
            raise ValueError(f"grad_reduce must be 'mean' or 'sum', not {self.grad_reduce!r}")
        if self.skip_with not in ("cond", "where"):
            raise ValueError(f"skip_with must be 'cond' or 'where', not {self.skip_with!r}")


def make_train_step(loss_fn: LossFn | StatefulLossFn, tx: optax.GradientTransformation,
                    strategy: Strategy | None = None, options: StepOptions = StepOptions(),
                    has_state: bool = False
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Build the per-device step `(state, batch) -> (state, summed_metrics)`.

    The returned metrics are sums over all devices (`loss`, `weight`, `nonfinite_steps` and
    each aux name); divide by `weight` for the exact mean. Map the step with a backend from
    `jaxdist.parallel`. `has_state` says `loss_fn` is in the stateful form.

    A step whose global loss or gradient holds a NaN or inf counts 1 in `nonfinite_steps`.
    With `options.skip_nonfinite` it also changes neither the params, the model state nor
    the optimizer state, on every device alike (the test is made on the all-reduced values,
    which every device shares), and its metric sums are zeroed. `skip_with="cond"` branches
    (`lax.cond`); `"where"` computes the update and selects, leaf by leaf, with no branch.

    A micro-batch whose total weight over all devices is 0 (all padding) leaves the model
    state (e.g. BatchNorm's running statistics) as it was.

    `strategy` (`jaxdist.parallel.strategies`, from `StateLayout.strategy()`; None: all
    replicated) says how the gradients are reduced and the update applied: with a split
    layout each device updates its chunk of the parameters with its chunk of the
    optimizer state (`tx` must then sum its global quantities over the devices:
    `build_optimizer(..., across=AXIS)`). Compile the step with the layout's `sharded` tree.
    """
    return TrainStep(loss_fn if has_state else stateful(loss_fn), tx, strategy or Strategy(),
                     options, has_state)


class TrainStep:
    """The step `make_train_step` builds, as a callable (its parts are the methods)."""

    def __init__(self, loss: StatefulLossFn, tx: optax.GradientTransformation,
                 strategy: Strategy, options: StepOptions, has_state: bool):
        self.loss = strategy.loss(loss, by_model=options.gathers_params)
        self.tx, self.strategy, self.options, self.has_state = tx, strategy, options, has_state
        self.accumulating = options.grad_accum > 1
        self._grad = jax.grad(self._weighted_loss_sum, has_aux=True)

    def __call__(self, state: TrainState, batch: Batch
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One update of `state` from this device's `batch`; the metrics summed over devices."""
        o, strategy = self.options, self.strategy
        rng = device_rng(state.rng, state.step)
        grads, totals, model_state = self._reduced_gradients(state.params, state.model_state,
                                                             batch, rng)
        own = strategy.own(state.params)

        def update(model_state):
            updates, opt_state = self.tx.update(grads, state.opt_state, own)
            return strategy.apply(own, updates), opt_state, model_state

        finite = strategy.all_finite((totals[LOSS_SUM], grads))
        kept = (state.params, state.opt_state, state.model_state)
        if o.skip_nonfinite and o.skip_with == "cond":
            # The finite path costs no extra pass over the params and optimizer state.
            params, opt_state, model_state = jax.lax.cond(finite, update, lambda _: kept,
                                                          model_state)
        elif o.skip_nonfinite:
            params, opt_state, model_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old), update(model_state), kept)
        if o.skip_nonfinite:
            totals = {name: jnp.where(finite, value, 0.0) for name, value in totals.items()}
        else:
            params, opt_state, model_state = update(model_state)
        totals[NONFINITE] = 1.0 - finite.astype(jnp.float32)
        logs = self._ends_log_window(state.step)
        if logs is not None:
            totals.update(self._norms(logs, grads, own, strategy.own(params)))
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               rng=state.rng, model_state=model_state)
        return new_state, totals

    def _ends_log_window(self, step: jax.Array) -> jax.Array | None:
        """Whether the step after `step` updates is logged (None: norms are off)."""
        o = self.options
        if not o.norms_every:
            return None
        return (step + 1) % o.norms_every == 0

    def _norms(self, logs: jax.Array, grads: PyTree, own: PyTree,
               new_own: PyTree) -> dict[str, jax.Array]:
        """grad_norm, param_norm and update_norm of this step (0 when it is not logged).

        The update is taken as the parameters' change, `new_own - own`, read after the step:
        a second reader of the optimizer's updates inside the step changes how XLA fuses the
        update, and with it, in bf16 programs, the last bits of training.
        """
        split = self.strategy.splits

        def norms():
            return global_norms([square_parts(grads, split), square_parts(own, split),
                                 change_square_parts(new_own, own, split)],
                                self.strategy.total)

        values = jax.lax.cond(logs, norms, lambda: jnp.zeros(3, jnp.float32))
        return dict(zip(NORM_KEYS, values, strict=True))

    def _weighted_loss_sum(self, params, model_state, batch, rng, scale=None):
        losses, aux, new_state = self.loss(params, model_state, batch, rng)
        sums = _weighted_sums(losses, aux, batch["weight"])
        if self.has_state:
            check_same_structure(new_state, model_state)
            require_same_on_every_device(new_state, "model_state")
            # One scalar psum: a batch that is all padding on every device changes nothing.
            seen = self.strategy.total(sums[WEIGHT_SUM]) > 0
            new_state = jax.tree.map(lambda new, old: jnp.where(seen, new, old), new_state,
                                     model_state)
        total = sums[LOSS_SUM] if scale is None else sums[LOSS_SUM] * scale
        return total, (sums, new_state)

    def _micro_gradients(self, params, model_state, batch, rng, scale):
        grads, aux = self._grad(params, model_state, batch, rng, scale)
        return self.strategy.micro_gradients(grads, self.accumulating), aux

    def _local_gradients(self, params, model_state, batch, rng, scale):
        """Gradient of this device's weighted loss sum, its metric sums, the model state."""
        # Marked as differing across devices, the params' gradient is this device's own;
        # the step's psum is then the one reduction, under shard_map as under pmap.
        params = mark_varying(params)
        if not self.accumulating:
            grads, (sums, model_state) = self._micro_gradients(params, model_state, batch,
                                                               rng, scale)
            return grads, sums, model_state
        steps = self.options.grad_accum
        micro = jax.tree.map(lambda x: x.reshape(steps, -1, *x.shape[1:]), batch)

        def accumulate(carry, inputs):
            grads, sums, model_state = carry
            index, micro_batch = inputs
            g, (s, model_state) = self._micro_gradients(params, model_state, micro_batch,
                                                        jax.random.fold_in(rng, index), scale)
            return (mark_varying(jax.tree.map(jnp.add, grads, g)),
                    mark_varying(jax.tree.map(jnp.add, sums, s)), model_state), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
            self._micro_gradients, params, model_state, jax.tree.map(lambda x: x[0], micro),
            rng, scale))
        carry = (mark_varying(zeros[0]), mark_varying(zeros[1][0]), model_state)
        (grads, sums, model_state), _ = jax.lax.scan(
            accumulate, carry, (jnp.arange(steps), micro))
        return grads, sums, model_state

    def _reduced_gradients(self, params, model_state, batch, rng):
        """The gradient (whole, or this device's chunk of it), the metric sums, model state."""
        o, strategy = self.options, self.strategy
        # Under `sum`, each device's gradient is of its own mean loss. Split, scaling the
        # differentiated loss by 1 / (its weight) makes the reduction the plain sum;
        # whole, each device divides its gradient before the all-reduce.
        scale = None
        if o.grad_reduce == "sum" and strategy.splits:
            scale = 1.0 / _nonzero(jnp.sum(batch["weight"].astype(jnp.float32)))
        grads, local, model_state = self._local_gradients(params, model_state, batch, rng,
                                                          scale)
        # Two separate psums: one all-reduce mixing the gradients with the scalar metrics
        # measured about 7% slower on 8 CPU devices (scripts/bench_step.py).
        totals = strategy.total(local)
        if o.grad_reduce == "sum" and not strategy.splits:
            grads = jax.tree.map(lambda g: g / _nonzero(local[WEIGHT_SUM]), grads)
        grads = strategy.reduce(grads, self.accumulating)
        if o.grad_reduce == "mean":
            grads = jax.tree.map(lambda g: g / _nonzero(totals[WEIGHT_SUM]), grads)
        return grads, totals, model_state


def make_eval_step(eval_fn: EvalFn | StatefulEvalFn, strategy: Strategy | None = None,
                   has_state: bool = False, gathers_params: bool = False
                   ) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """Build the per-device step `(state, batch) -> summed_metrics`.

    `eval_fn(params, batch) -> (losses, aux)` (or `eval_fn(params, model_state, batch)` with
    `has_state`) is deterministic (no dropout). Padding rows weigh 0, so summing over an
    epoch of padded batches counts every example exactly once. With a `strategy` whose
    parameters are split, they are gathered first (or by `eval_fn`: `gathers_params`).
    """
    strategy = strategy or Strategy()
    evaluate = strategy.loss(eval_fn if has_state else stateful_eval(eval_fn),
                             by_model=gathers_params)

    def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        losses, aux = evaluate(state.params, state.model_state, batch)
        return jax.lax.psum(_weighted_sums(losses, aux, batch["weight"]), AXIS)

    return eval_step


def _nonzero(total: jax.Array) -> jax.Array:
    # A device (or a whole batch) of padding only has weight 0 and gradient sum 0: divide by 1.
    return jnp.where(total > 0, total, 1.0)
