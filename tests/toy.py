"""A small MLP regression experiment for the core's tests (plain jax, no model library)."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxdist import Config, Experiment, OptimizerConfig, ParallelConfig, TrainConfig
from jaxdist.step.precision import cast_floats, compute_dtype


def make_data(n: int = 96, features: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = (np.sin(x @ rng.normal(size=features)) + 0.1 * rng.normal(size=n)).astype(np.float32)
    return {"x": x, "y": y}


def mlp_experiment(data: dict[str, np.ndarray] | None = None, hidden: int = 16,
                   input_noise: float = 0.0, precision: str = "fp32") -> Experiment:
    """An MLP; `input_noise` > 0 adds per-device random noise to the inputs (uses the rng).

    With `precision="bf16"` the MLP computes in bfloat16 (the error and loss in float32).
    """
    dtype = compute_dtype(precision)
    data = make_data() if data is None else data
    features = data["x"].shape[1]

    def init_params(rng):
        k1, k2 = jax.random.split(rng)
        return {"w1": jax.random.normal(k1, (features, hidden)) / np.sqrt(features),
                "b1": jnp.zeros(hidden),
                "w2": jax.random.normal(k2, (hidden,)) / np.sqrt(hidden),
                "b2": jnp.zeros(())}

    def loss_fn(params, batch, rng):
        x = batch["x"]
        if input_noise:
            x = x + input_noise * jax.random.normal(rng, x.shape)
        params, x = cast_floats((params, x), dtype)
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        error = (h @ params["w2"] + params["b2"]).astype(jnp.float32) - batch["y"]
        return error**2, {"abs_error": jnp.abs(error)}

    return Experiment(init_params=init_params, loss_fn=loss_fn, train_data=data,
                      eval_data=data, precision=precision)


def toy_config(steps: int = 5, batch_size: int = 32, devices: int = 0, backend: str = "pmap",
               optimizer: str = "adam", learning_rate: float = 0.01,
               grad_reduce: str = "mean", seed: int = 0, log_every: int = 1) -> Config:
    return Config(
        train=TrainConfig(steps=steps, batch_size=batch_size, seed=seed, log_every=log_every),
        optimizer=OptimizerConfig(name=optimizer, learning_rate=learning_rate),
        parallel=ParallelConfig(backend=backend, grad_reduce=grad_reduce, devices=devices),
    )


def wait_for_file(path: Path, timeout: float = 120) -> bool:
    """Wait until `path` exists (a subprocess run has started logging); False on timeout."""
    deadline = time.time() + timeout
    while not Path(path).exists() and time.time() < deadline:
        time.sleep(0.1)
    return Path(path).exists()


def train_into(workdir: Path | str, name: str | Path, *overrides: str) -> None:
    """Train `name` with `overrides` into `workdir` in this process, as `jaxdist.run` would.

    For a test whose subject is a later command on that workdir: the run itself adds
    nothing in a process of its own (tests/test_python_api.py checks that both write the
    same). It must finish.
    """
    import jaxdist

    experiment, config = jaxdist.load(str(name), list(overrides))
    result = jaxdist.fit(experiment, config, str(workdir), stream=None)
    assert result.stop_reason == "completed", result
