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
    "Backend": "jaxdist.parallel.backend", "make_backend": "jaxdist.parallel.backends",
    "Config": "jaxdist.base.config", "OptimizerConfig": "jaxdist.base.config",
    "ParallelConfig": "jaxdist.base.config", "TrainConfig": "jaxdist.base.config",
    "Experiment": "jaxdist.step.experiment", "ExplainSpec": "jaxdist.step.experiment",
    "TrainResult": "jaxdist.loop.fit", "fit": "jaxdist.loop.fit",
    "TrainState": "jaxdist.step.steps", "make_eval_step": "jaxdist.step.steps",
    "make_train_step": "jaxdist.step.steps",
    "UserError": "jaxdist.base.errors", "load": "jaxdist.loop.discovery",
    "use_cpu_devices": "jaxdist.parallel.devices",
    "from_nnx": "jaxdist.step.adapters.nnx", "from_equinox": "jaxdist.step.adapters.equinox",
}
__all__ = [
    "Backend", "Config", "Experiment", "ExplainSpec", "OptimizerConfig", "ParallelConfig",
    "TrainConfig", "TrainResult", "TrainState", "UserError", "fit", "from_equinox", "from_nnx",
    "load", "make_backend",
    "make_eval_step", "make_train_step", "use_cpu_devices",
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
    from jaxdist.loop.preemption import StartupSignals

    StartupSignals.install()

if TYPE_CHECKING:
    from jaxdist.base.config import Config, OptimizerConfig, ParallelConfig, TrainConfig
    from jaxdist.base.errors import UserError
    from jaxdist.loop.discovery import load
    from jaxdist.loop.fit import TrainResult, fit
    from jaxdist.parallel.backend import Backend
    from jaxdist.parallel.backends import make_backend
    from jaxdist.parallel.devices import use_cpu_devices
    from jaxdist.step.adapters.equinox import from_equinox
    from jaxdist.step.adapters.nnx import from_nnx
    from jaxdist.step.experiment import Experiment, ExplainSpec
    from jaxdist.step.steps import TrainState, make_eval_step, make_train_step


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'jaxdist' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
