"""Experiment trackers (MLflow, W&B): every logged point of process 0, also sent to them.

`tracking.mlflow=URI` turns MLflow on, `tracking.wandb=PROJECT` Weights & Biases. A
tracker's client is an optional extra, refused before the first step (one line naming the
install command) when it is missing; once the run trains, a tracker that fails never stops
it (`jaxdist.loop.trackers.sender`).
"""

from __future__ import annotations

import importlib
import importlib.util
import threading

from jaxdist.base.config import Config
from jaxdist.base.errors import UserError
from jaxdist.loop.hooks import Hook
from jaxdist.loop.trackers.hook import TrackerHook
from jaxdist.loop.trackers.mlflow_tracker import MlflowTracker
from jaxdist.loop.trackers.wandb_tracker import WandbTracker

# key: (the module it needs, the extra that installs it, the modules its client imports)
NEEDS = {"tracking.mlflow": ("mlflow", "mlflow", ("mlflow.entities", "mlflow.tracking")),
         "tracking.wandb": ("wandb", "wandb", ("wandb",))}


def check_tracker_extras(config: Config) -> None:
    """Refuse (one line) a tracker that is turned on but whose client is not installed."""
    for key, (module, extra, _) in NEEDS.items():
        if _turned_on(config, key) and not _installed(module):
            raise UserError(f"{key} needs {module}, which is not installed; pip install "
                            f"\"jaxdist[{extra}]\" (or leave {key} empty)")


def preload_tracker_clients(config: Config) -> None:
    """Import the clients of the trackers turned on, in a thread, while the steps compile.

    MLflow's client takes seconds to import; imported when the loop starts, it would hold
    the interpreter beside the first steps.
    """
    modules = [name for key, (_, _, client) in NEEDS.items() if _turned_on(config, key)
               for name in client]
    if modules:
        threading.Thread(target=lambda: [importlib.import_module(m) for m in modules],
                         name="jaxdist-tracker-import", daemon=True).start()


def _turned_on(config: Config, key: str) -> bool:
    section, name = key.split(".")
    return bool(getattr(getattr(config, section), name))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None
        return False


def tracker_hooks(config: Config, experiment: str, primary: bool) -> list[Hook]:
    """The hooks of the trackers `config.tracking` turns on (process 0 alone has any)."""
    t = config.tracking
    if not primary:
        return []
    trackers = []
    if t.mlflow:
        trackers.append(MlflowTracker(t.mlflow, t.mlflow_experiment))
    if t.wandb:
        trackers.append(WandbTracker(t.wandb, t.wandb_entity))
    return [TrackerHook(tracker, experiment) for tracker in trackers]
