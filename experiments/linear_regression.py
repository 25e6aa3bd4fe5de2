"""Linear regression y = W.x + b on scikit-learn's diabetes data, by distributed gradient descent.

The seed's model: the 442 rows are split over all devices; each device computes the gradient
of its rows' squared errors and the update uses the gradient of the mean over all 442 rows
(padding rows weigh 0). With `train.batch_size=full` (the default) this is plain full-batch
gradient descent and converges to the least-squares solution.

Features are standardized (zero mean, unit variance: a linear change of variables, so the
least-squares fit is the same); the target stays in its original units, so the loss is the
mean squared error in those units. The final `eval` line is the MSE of the final
parameters over all 442 rows. With `train.precision=bf16` the prediction `W.x + b` is
computed in bfloat16; the targets and the squared error stay float32.

Command:   python -m jaxdist.run linear_regression
Runtime:   about 6 s on a 2-core CPU with 8 fake devices, most of it start-up (measured
           2026-11-27 by `python scripts/bench_experiments.py`).
Result:    final MSE 2859.7, the numpy least-squares MSE (2859.70) to within 0.01%.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments._sklearn_files import DIABETES_FEATURES, load_diabetes_rows
from jaxdist import Config, Experiment, ExplainSpec, OptimizerConfig, TrainConfig
from jaxdist.base.config import apply_overrides
from jaxdist.step.precision import cast_floats, compute_dtype


@dataclass
class LinearModelConfig:
    """Initial parameters of the linear model."""

    init_scale: float = 0.0  # std of the initial weights; 0 starts from W = 0, b = 0


def config() -> Config:
    """Full-batch gradient descent: 1000 steps at learning rate 0.2 (stable below 0.248)."""
    return Config(
        train=TrainConfig(steps=1000, batch_size=0, log_every=100),
        optimizer=OptimizerConfig(name="sgd", learning_rate=0.2),
        model=LinearModelConfig(),
    )


def tiny_config() -> Config:
    """A few seconds' version for the test suite (8 fake CPU devices)."""
    return apply_overrides(config(), [
        "train.steps=20", "train.log_every=5"])


def load_data() -> dict[str, np.ndarray]:
    """The diabetes rows: standardized float32 features `x` [442, 10], target `y` [442]."""
    features, target = load_diabetes_rows()
    features = (features - features.mean(0)) / features.std(0)
    return {"x": features.astype(np.float32), "y": target.astype(np.float32)}


def predict(params: dict, x: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """Y = W.x + b for each row of `x`, computed in `dtype`."""
    params, x = cast_floats((params, x), dtype)
    return x @ params["w"] + params["b"]


def make_loss_fn(dtype: Any = jnp.float32) -> Callable:
    """Per-example squared error (float32), with the absolute error as an extra metric."""

    def loss_fn(params: dict, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        del rng  # the model has no randomness
        error = predict(params, batch["x"], dtype).astype(jnp.float32) - batch["y"]
        return error**2, {"abs_error": jnp.abs(error)}

    return loss_fn


def build(config: Config) -> Experiment:
    """The linear model, its loss, and the diabetes rows (trained and evaluated on)."""
    data = load_data()
    num_features = data["x"].shape[1]
    scale = config.model.init_scale

    def init_params(rng: jax.Array) -> dict:
        return {"w": scale * jax.random.normal(rng, (num_features,)), "b": jnp.zeros(())}

    precision = config.train.precision
    dtype = compute_dtype(precision)
    explain = ExplainSpec(input="x", label="y", kind="tabular",
                          output=lambda params, model_state, x: predict(params, x, dtype),
                          coefficients=lambda params: params["w"],
                          feature_names=DIABETES_FEATURES)
    return Experiment(init_params=init_params, loss_fn=make_loss_fn(dtype), train_data=data,
                      eval_data=data, precision=precision, explain=explain)
