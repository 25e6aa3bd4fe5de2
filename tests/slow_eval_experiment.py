"""Test experiment: linear regression whose evaluation is slow and says when it starts.

Each evaluation batch takes 0.2 s on the host. The second batch read writes the file named
by $SLOW_EVAL_STARTED (the first is read at start-up, to check the eval step's shapes), so
a test knows when the final evaluation is under way.
"""

import os
import time
from pathlib import Path

import numpy as np

from experiments import linear_regression
from jaxdist import Config, Experiment
from jaxdist.base.config import apply_overrides
from jaxdist.data import ArraySource


class SlowSource(ArraySource):
    """Rows of arrays, served slowly."""

    reads = 0

    def get_batch(self, indices):
        self.reads += 1
        marker = os.environ.get("SLOW_EVAL_STARTED")
        if marker and self.reads == 2:
            Path(marker).touch()
        time.sleep(0.2)
        return super().get_batch(indices)


def config() -> Config:
    """Linear regression in batches of 16, so the evaluation has 28 of them."""
    return apply_overrides(linear_regression.config(), [
        "train.steps=6", "train.batch_size=16", "train.log_every=2",
        "train.checkpoint_every=0"])


def build(config: Config) -> Experiment:
    """linear_regression, with the slow evaluation source."""
    base = linear_regression.build(config)
    data = linear_regression.load_data()
    return Experiment(init_params=base.init_params, loss_fn=base.loss_fn,
                      train_data={k: np.asarray(v) for k, v in data.items()},
                      eval_data=SlowSource(data), name="slow_eval_experiment")
