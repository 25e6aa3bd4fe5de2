"""An experiment that hands jaxdist an equinox module as its params (what from_equinox is for)."""

import equinox as eqx
import jax
import numpy as np

from jaxdist import Config, Experiment, TrainConfig


def config():
    return Config(train=TrainConfig(steps=2, batch_size=16, log_every=1, eval_every=0))


def build(config):
    def loss_fn(model, batch, rng):
        return (jax.vmap(model)(batch["x"])[:, 0] - batch["y"]) ** 2, {}

    data = {"x": np.ones((32, 3), np.float32), "y": np.zeros(32, np.float32)}
    return Experiment(init_params=lambda rng: eqx.nn.MLP(3, 1, 8, 1, key=rng),
                      loss_fn=loss_fn, train_data=data)
