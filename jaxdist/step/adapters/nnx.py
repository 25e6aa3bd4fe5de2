"""A Flax NNX module as an experiment: `from_nnx(make_model, loss_fn, ...)`.

The module is split once, abstractly, into its graph (the static structure), its
`nnx.Param` state (the params, trained), its RNG state (rebuilt on each device at each
step from the run's key, never carried) and the rest (BatchNorm's `BatchStat`, any other
variable: the model state, carried from step to step as the core carries linen's
`batch_stats`). The params and the model state are plain nested dicts of arrays keyed by
the module's attribute names (`nnx.to_pure_dict`), so a checkpoint reads back into the
module with `nnx.replace_by_pure_dict` and `nnx.merge`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdist.base.pytree import PyTree
from jaxdist.step.adapters.common import explain_on_module
from jaxdist.step.experiment import Experiment, ExplainSpec

NnxLoss = Callable[[nnx.Module, dict], tuple[jax.Array, dict]]


class NnxParts:
    """The split of one NNX module: its graph, and the shapes of its three kinds of state."""

    def __init__(self, make_model: Callable[[nnx.Rngs], nnx.Module]):
        self.make_model = make_model
        abstract = nnx.eval_shape(lambda: make_model(nnx.Rngs(0)))
        self.graphdef, params, rngs, rest = nnx.split(abstract, nnx.Param, nnx.RngState, ...)
        self.param_shapes = nnx.to_pure_dict(params)
        self.rng_shapes = nnx.to_pure_dict(rngs)
        self.state_shapes = nnx.to_pure_dict(rest)
        self.init = jax.jit(self._init)

    @property
    def has_state(self) -> bool:
        """Whether the module has variables besides its params and RNG streams."""
        return bool(jax.tree.leaves(self.state_shapes))

    def _init(self, key: jax.Array) -> tuple[PyTree, PyTree]:
        module = self.make_model(nnx.Rngs(key))
        _, params, _, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def rng_state(self, key: jax.Array) -> PyTree:
        """Fresh RNG state for every stream of the module: stream i's key is `key` folded with i."""
        leaves, treedef = jax.tree.flatten(self.rng_shapes)
        fresh = [jax.random.fold_in(key, i) if jax.dtypes.issubdtype(leaf.dtype,
                                                                     jax.dtypes.prng_key)
                 else jnp.zeros(leaf.shape, leaf.dtype) for i, leaf in enumerate(leaves)]
        return jax.tree.unflatten(treedef, fresh)

    def merge(self, params: PyTree, model_state: PyTree, key: jax.Array) -> nnx.Module:
        """The module holding `params`, `model_state` and RNG streams seeded from `key`."""
        if model_state is None:
            model_state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.state_shapes)
        return nnx.merge(self.graphdef, params, self.rng_state(key), model_state)

    def model_state_of(self, module: nnx.Module) -> PyTree:
        """The module's model state (all but params and RNG state), as a pure dict."""
        _, _, _, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
        return nnx.to_pure_dict(rest)

    def module_of(self, params: PyTree, model_state: PyTree) -> nnx.Module:
        """The module in evaluation mode (`.eval()`), for evaluation, explanation and export."""
        module = self.merge(params, model_state, jax.random.key(0))
        module.eval()
        return module


def from_nnx(make_model: Callable[[nnx.Rngs], nnx.Module], loss_fn: NnxLoss,
             eval_fn: NnxLoss | None = None, *, train_data: Any, eval_data: Any = None,
             explain: ExplainSpec | None = None, **fields: Any) -> Experiment:
    """An `Experiment` that trains the NNX module `make_model(rngs)` builds.

    - `make_model(rngs: nnx.Rngs) -> nnx.Module`: builds the module (called abstractly
      once, and under `jax.jit` at initialization with `nnx.Rngs(key)`).
    - `loss_fn(module, batch) -> (losses, aux)`: per-example losses `[b]` and metrics on one
      device's slice; `module` is in training mode (`.train()`), its `nnx.Param` values the
      trained params, its RNG streams (Dropout's) seeded from this device's key of this
      step, and the variables it updates (BatchNorm's statistics) carried to the next step.
    - `eval_fn(module, batch)`: the same in evaluation mode (`.eval()`); by default
      `loss_fn` on the module in evaluation mode.
    - `explain`: an `ExplainSpec` whose `output(module, features)` (and `features(module,
      raw)`, `coefficients(module)`) take the module in evaluation mode.
    - `fields`: any other `Experiment` field (`precision`, `train_transform`, ...).

    Statistics over the device axis: `jaxdist.step.models.nnx_layers.CrossReplicaBatchNorm`
    weighs each example as the core does, so padding rows never enter them.
    """
    parts = NnxParts(make_model)
    evaluate = eval_fn or loss_fn

    def train_loss(params, model_state, batch, rng):
        module = parts.merge(params, model_state, rng)
        module.train()
        losses, aux = loss_fn(module, batch)
        return losses, aux, parts.model_state_of(module)

    def eval_loss(params, model_state, batch):
        return evaluate(parts.module_of(params, model_state), batch)

    if parts.has_state:
        pieces = dict(loss_fn=train_loss, eval_fn=eval_loss,
                      init_model_state=lambda rng: parts.init(rng)[1])
    else:
        pieces = dict(loss_fn=lambda params, batch, rng: train_loss(params, None, batch,
                                                                     rng)[:2],
                      eval_fn=lambda params, batch: eval_loss(params, None, batch))
    return Experiment(init_params=lambda rng: parts.init(rng)[0], train_data=train_data,
                      eval_data=eval_data, module_of=parts.module_of,
                      explain=explain_on_module(explain, parts.module_of), **pieces, **fields)
