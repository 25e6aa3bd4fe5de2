"""What an experiment gives the trainer: parameters, a loss, and data."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from jaxdist.base.pytree import PyTree
from jaxdist.data.row_random import RowRandom
from jaxdist.step.steps import EvalFn, LossFn


@dataclass(frozen=True)
class ExplainSpec:
    """What an experiment's predictions are, for attributions (`jaxdist.explain`).

    - `input`: the batch key whose values are explained, e.g. "image".
    - `output(params, model_state, features) -> [b]` (a regressor's prediction) or
      `[b, classes]` (a classifier's logits), deterministic (no dropout).
    - `features(params, raw) -> [b, ...]` float: what attributions are taken with respect
      to, when the raw input is not (integer tokens -> their embeddings, uint8 pixels ->
      normalized floats); default: the input itself, as float32.
    - `label`: the batch key of the true class or target, shown beside the predictions.
    - `kind`: how to picture them: "image", "tabular" or "text" (attributions of
      embeddings are summed over their last axis).
    - `coefficients(params) -> [features]`: a linear model's own weights, pictured beside
      the attributions of tabular data (optional); `feature_names` label tabular features.
    """

    input: str
    output: Callable[[PyTree, PyTree, Any], Any]
    features: Callable[[PyTree, Any], Any] | None = None
    label: str | None = None
    kind: str = "tabular"
    coefficients: Callable[[PyTree], Any] | None = None
    feature_names: tuple[str, ...] = ()


@dataclass
class Experiment:
    """The pieces of one experiment, built by its module's `build(config)`.

    - `init_params(rng) -> params`: any pytree of arrays (flax, equinox or plain dicts).
    - `loss_fn(params, batch, rng) -> (losses, aux)`: per-example losses `[b]` and a dict of
      per-example metrics `[b]` on one device's slice of the batch.
    - `train_data`: a dict of equal-length numpy arrays (one row per example), a
      `jaxdist.data` source (e.g. `NpyFolderSource`), or any map-style data set whose items
      are dicts of arrays.
    - `eval_data`: the same for evaluation (optional); the final evaluation is logged with
      `split: "eval"`.
    - `eval_fn(params, batch) -> (losses, aux)`: the deterministic loss for evaluation;
      by default `loss_fn` with a fixed key.
    - `init_model_state(rng) -> model_state`: for models with state that gradients do not
      train (BatchNorm statistics). When given, `loss_fn` is
      `loss_fn(params, model_state, batch, rng) -> (losses, aux, new_model_state)` and
      `eval_fn` is `eval_fn(params, model_state, batch) -> (losses, aux)` (required).
    - `train_transform(batch, rng) -> batch`: host-side augmentation of training batches
      (see `jaxdist.data.augment`); `rng` is a `jaxdist.data.RowRandom`, one random stream
      per row, which repeats on resume and on any number of processes.
    - `name`: the experiment's name, recorded in checkpoints so that a workdir is never
      resumed by another experiment (the CLI sets it from the module or file name);
      `source`: how to load it again, a bundled name or a file path (the CLI sets it; it is
      written to `config.json`, where `python -m jaxdist.explain` finds it).
    - `explain`: what `jaxdist.explain` attributes: an `ExplainSpec` (optional).
    - `precision`: what the model computes in, `"fp32"` or `"bf16"`; it must equal the
      config's `train.precision`. Precision lives in the model: for "bf16", `build(config)`
      builds it to compute in bfloat16 from float32 params (flax: `dtype=jnp.bfloat16`, see
      `jaxdist.step.precision`), leaving targets, losses and metrics in float32, and says so
      here. An experiment that ignores `train.precision` keeps "fp32" and refuses "bf16".
    - `gathers_params`: under `parallel.shard=params`, the loss and eval functions get every
      parameter as this device's chunk (a `jaxdist.parallel.chunks.Chunk`, which knows its
      cut) and gather each layer's where it is used, with
      `jaxdist.parallel.chunks.gather_where_used` (inside `nn.remat`, so that the backward pass
      gathers again and at most one layer's weights are whole). False (the default): the
      step gathers them all before calling them.
    - `module_of(params, model_state) -> module`: the user's own module (evaluation mode)
      holding these params, set by `jaxdist.from_nnx` and `jaxdist.from_equinox` (None for
      linen and plain functions, whose params are the model's own tree).
    """

    init_params: Callable[[jax.Array], PyTree]
    loss_fn: LossFn
    train_data: Mapping[str, np.ndarray] | Any
    eval_data: Mapping[str, np.ndarray] | Any | None = None
    eval_fn: EvalFn | None = None
    init_model_state: Callable[[jax.Array], PyTree] | None = None
    train_transform: Callable[[dict, RowRandom], dict] | None = None
    precision: str = "fp32"
    name: str = ""
    source: str = ""
    explain: ExplainSpec | None = None
    gathers_params: bool = False
    module_of: Callable[[PyTree, PyTree], Any] | None = None

    @property
    def has_state(self) -> bool:
        """Whether the model carries state besides its params (the stateful loss form)."""
        return self.init_model_state is not None

    def evaluation_fn(self) -> EvalFn:
        """`eval_fn`, or `loss_fn` with a fixed key when none was given."""
        if self.eval_fn is not None:
            return self.eval_fn
        if self.has_state:
            raise ValueError("an experiment with init_model_state must give eval_fn")
        loss_fn = self.loss_fn

        def fixed_key_loss(params: PyTree, batch: dict) -> tuple[jax.Array, dict]:
            return loss_fn(params, batch, jax.random.key(0))

        return fixed_key_loss
