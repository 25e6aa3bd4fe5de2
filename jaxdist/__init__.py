"""jaxdist: data-parallel deep-learning research in JAX.

One pure per-device train step, mapped with `jax.pmap` or `jax.jit(jax.shard_map(...))`,
with gradients combined across devices as the exact global weighted mean.

The names below are imported when first used, so that `python -m jaxdist.run` sets up its
signal handling before jax is imported (a Ctrl-C during start-up is then one line).
"""

from __future__ import annotations

import importlib
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

_WHERE = {
    "Backend": "jaxdist.parallel", "make_backend": "jaxdist.parallel",
    "Config": "jaxdist.config", "OptimizerConfig": "jaxdist.config",
    "ParallelConfig": "jaxdist.config", "TrainConfig": "jaxdist.config",
    "Experiment": "jaxdist.experiment", "ExplainSpec": "jaxdist.experiment",
    "TrainResult": "jaxdist.train", "fit": "jaxdist.train",
    "TrainState": "jaxdist.step", "make_eval_step": "jaxdist.step",
    "make_train_step": "jaxdist.step",
    "UserError": "jaxdist.errors", "load": "jaxdist.discovery",
}
__all__ = [
    "Backend", "Config", "Experiment", "ExplainSpec", "OptimizerConfig", "ParallelConfig",
    "TrainConfig", "TrainResult", "TrainState", "UserError", "fit", "load", "make_backend",
    "make_eval_step", "make_train_step",
]

def _starting_the_run_command() -> bool:
    """Whether this process is `python -m jaxdist.run` (or the `jaxdist` script) starting."""
    argv = list(getattr(sys, "orig_argv", ()))
    if "-m" in argv and argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["jaxdist.run"]:
        return True
    return len(argv) > 1 and Path(argv[1]).name == "jaxdist"


# The command's Ctrl-C and SIGTERM are one line from here on, the first code of jaxdist that
# runs, rather than from its `main` (a signal before that was a KeyboardInterrupt traceback).
if _starting_the_run_command() and threading.current_thread() is threading.main_thread():
    from jaxdist.preemption import StartupSignals

    StartupSignals.install()

if TYPE_CHECKING:
    from jaxdist.config import Config, OptimizerConfig, ParallelConfig, TrainConfig
    from jaxdist.discovery import load
    from jaxdist.errors import UserError
    from jaxdist.experiment import Experiment, ExplainSpec
    from jaxdist.parallel import Backend, make_backend
    from jaxdist.step import TrainState, make_eval_step, make_train_step
    from jaxdist.train import TrainResult, fit


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'jaxdist' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
