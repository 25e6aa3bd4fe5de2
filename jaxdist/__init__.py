"""jaxdist: data-parallel deep-learning research in JAX.

One pure per-device train step, mapped with `jax.pmap` or `jax.jit(jax.shard_map(...))`,
with gradients combined across devices as the exact global weighted mean.
"""

from jaxdist.config import Config, OptimizerConfig, ParallelConfig, TrainConfig
from jaxdist.discovery import load
from jaxdist.errors import UserError
from jaxdist.experiment import Experiment, ExplainSpec
from jaxdist.parallel import Backend, make_backend
from jaxdist.step import TrainState, make_eval_step, make_train_step
from jaxdist.train import TrainResult, fit

__all__ = [
    "Backend",
    "Config",
    "Experiment",
    "ExplainSpec",
    "OptimizerConfig",
    "ParallelConfig",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "UserError",
    "fit",
    "load",
    "make_backend",
    "make_eval_step",
    "make_train_step",
]
