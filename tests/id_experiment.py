"""Test experiment: every example carries its index, and the metrics add the indices up.

Over one epoch, the mean of `id` and of `id_squared` over the examples read, and their
count, tell whether every example was read exactly once, whatever the processes and devices.
"""

import jax.numpy as jnp
import numpy as np

from jaxdist import Config, Experiment, OptimizerConfig, TrainConfig

SIZE = 96


def config() -> Config:
    """One epoch of 3 batches of 32."""
    return Config(train=TrainConfig(steps=3, batch_size=32, log_every=3),
                  optimizer=OptimizerConfig(name="sgd", learning_rate=0.01))


def build(config: Config) -> Experiment:
    """A one-weight model whose aux metrics are the example indices."""
    ids = np.arange(SIZE)
    data = {"x": (ids % 7).astype(np.float32), "y": (ids % 5).astype(np.float32),
            "id": ids.astype(np.float32)}

    def loss_fn(params, batch, rng):
        error = params["w"] * batch["x"] - batch["y"]
        return error**2, {"id": batch["id"], "id_squared": batch["id"] ** 2}

    return Experiment(init_params=lambda rng: {"w": jnp.zeros(())}, loss_fn=loss_fn,
                      train_data=data, eval_data=data)
