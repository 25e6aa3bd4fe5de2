"""Test experiment: linear regression that fails on process 1 only, where $FAULT says.

FAULT=build: `build()` refuses its data on process 1. FAULT=train: process 1's data
transform fails in the second epoch, mid-training.
"""

import os

import jax

from experiments import linear_regression
from jaxdist import Config, Experiment
from jaxdist.base.config import apply_overrides
from jaxdist.base.errors import UserError


def config() -> Config:
    """Batches of 64 (7 per epoch), logged every 2 steps."""
    return apply_overrides(linear_regression.config(), [
        "train.batch_size=64", "train.log_every=2", "train.steps=1000000",
        "train.checkpoint_every=0"])


def build(config: Config) -> Experiment:
    """linear_regression, faulty on process 1."""
    fault = os.environ.get("FAULT", "")
    if fault == "build" and jax.process_index() == 1:
        raise UserError("process 1's data shard is missing (a test fault)")
    base = linear_regression.build(config)
    steps = {"seen": 0}

    def transform(batch, rng):
        steps["seen"] += 1
        if fault == "train" and jax.process_index() == 1 and steps["seen"] > 10:
            raise UserError("process 1 read a corrupt record (a test fault)")
        return batch

    return Experiment(init_params=base.init_params, loss_fn=base.loss_fn,
                      train_data=base.train_data, eval_data=base.eval_data,
                      train_transform=transform)
