"""An equinox module as an experiment: `from_equinox(make_model, loss_fn, ...)`.

The module is partitioned once, abstractly, into its arrays (the params, trained) and
the rest (functions, sizes, flags: static, part of the compiled step). A model built with
`eqx.nn.make_with_state` brings its `eqx.nn.State` (BatchNorm's running statistics), which
the core carries as the model state. The params are the module with `None` where its
static fields are (`eqx.partition(module, eqx.is_array)[0]`), so a checkpoint reads back
into the module with `eqx.combine(params, static)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxdist.base.errors import UserError
from jaxdist.base.pytree import PyTree
from jaxdist.step.adapters.common import explain_on_module
from jaxdist.step.experiment import Experiment, ExplainSpec

EQUINOX_BATCHNORM = (
    "eqx.nn.BatchNorm failed to trace inside jax.shard_map, where jaxdist traces every step "
    "(equinox 0.13.8 with jax 0.10 refuses its State.set in mode='ema' and its pmean in "
    "mode='batch'); use jaxdist.step.models.eqx_layers.CrossReplicaBatchNorm, which also "
    "keeps padding rows out of the statistics")


def fresh(state: PyTree) -> PyTree:
    """A copy of `state` for the user's code.

    `eqx.nn.State.set` invalidates the object it is called on, and the core reads the state
    it passed in again (to check the new one).
    """
    leaves, treedef = jax.tree.flatten(state)
    return jax.tree.unflatten(treedef, leaves)


class EquinoxParts:
    """The partition of one equinox module: its static part, and whether it has a State."""

    def __init__(self, make_model: Callable[[jax.Array], Any]):
        self.make_model = make_model
        shapes = eqx.filter_eval_shape(make_model, jax.random.key(0))
        self.stateful = (isinstance(shapes, tuple) and len(shapes) == 2
                         and isinstance(shapes[1], eqx.nn.State))
        module_shapes = shapes[0] if self.stateful else shapes
        self.state_shapes = shapes[1] if self.stateful else None
        _, self.static = eqx.partition(module_shapes,
                                       lambda x: isinstance(x, jax.ShapeDtypeStruct))
        self.has_equinox_batchnorm = any(
            isinstance(leaf, eqx.nn.BatchNorm) for leaf in
            jax.tree.leaves(module_shapes, is_leaf=lambda x: isinstance(x, eqx.nn.BatchNorm)))
        self.init = jax.jit(self._init)

    def _init(self, key: jax.Array) -> tuple[PyTree, PyTree]:
        made = self.make_model(key)
        module, state = made if self.stateful else (made, None)
        return eqx.partition(module, eqx.is_array)[0], state

    def combine(self, params: PyTree) -> Any:
        """The module holding `params` (training mode, as `make_model` built it)."""
        return eqx.combine(params, self.static)

    def module_of(self, params: PyTree, model_state: PyTree) -> Any:
        """The module in inference mode, with its state when it has one: `(module, state)`."""
        module = eqx.nn.inference_mode(self.combine(params))
        if not self.stateful:
            return module
        if model_state is None:
            model_state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.state_shapes)
        return module, model_state


def from_equinox(make_model: Callable[[jax.Array], Any], loss_fn: Callable,
                 eval_fn: Callable | None = None, *, train_data: Any, eval_data: Any = None,
                 explain: ExplainSpec | None = None, **fields: Any) -> Experiment:
    """An `Experiment` that trains the equinox module `make_model(key)` builds.

    - `make_model(key) -> module`, or `-> (module, state)` as
      `eqx.nn.make_with_state(Model)(..., key=key)` gives (called abstractly once, and
      under `jax.jit` at initialization).
    - `loss_fn(module, batch, key) -> (losses, aux)`: per-example losses `[b]` and metrics
      on one device's slice, `key` this device's key of this step (for Dropout); with a
      state, `loss_fn(module, state, batch, key) -> (losses, aux, state)`.
    - `eval_fn(module, batch)` (with a state: `eval_fn(module, state, batch)`): `module` in
      inference mode (`eqx.nn.inference_mode`); by default `loss_fn` on it, with a fixed key.
    - `explain`: an `ExplainSpec` whose `output(module, features)` (and `features(module,
      raw)`, `coefficients(module)`) take the module in inference mode, or
      `(module, state)` for a model with a state.
    - `fields`: any other `Experiment` field (`precision`, `train_transform`, ...).
    """
    parts = EquinoxParts(make_model)
    key0 = jax.random.key(0)

    def inference(params: PyTree) -> Any:
        return eqx.nn.inference_mode(parts.combine(params))

    if parts.stateful:
        def train_loss(params, model_state, batch, rng):
            try:
                return loss_fn(parts.combine(params), fresh(model_state), batch, rng)
            except ValueError as error:
                if parts.has_equinox_batchnorm:
                    raise UserError(EQUINOX_BATCHNORM) from error
                raise

        def eval_loss(params, model_state, batch):
            if eval_fn is not None:
                return eval_fn(inference(params), fresh(model_state), batch)
            return loss_fn(inference(params), fresh(model_state), batch, key0)[:2]

        pieces = dict(loss_fn=train_loss, eval_fn=eval_loss,
                      init_model_state=lambda rng: parts.init(rng)[1])
    else:
        def train_loss(params, batch, rng):
            return loss_fn(parts.combine(params), batch, rng)

        def eval_loss(params, batch):
            if eval_fn is not None:
                return eval_fn(inference(params), batch)
            return loss_fn(inference(params), batch, key0)

        pieces = dict(loss_fn=train_loss, eval_fn=eval_loss)
    return Experiment(init_params=lambda rng: parts.init(rng)[0], train_data=train_data,
                      eval_data=eval_data, module_of=parts.module_of,
                      explain=explain_on_module(explain, parts.module_of), **pieces, **fields)
