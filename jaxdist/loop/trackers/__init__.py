"""Experiment trackers (MLflow): every logged point of process 0, also sent to the tracker.

`tracking.mlflow=URI` turns MLflow on. The tracker's client is an optional extra, refused
before the first step (one line naming the install command) when it is missing; once the
run trains, a tracker that fails never stops it (`jaxdist.loop.trackers.sender`).
"""

from __future__ import annotations

import importlib.util

from jaxdist.base.config import Config
from jaxdist.base.errors import UserError
from jaxdist.loop.hooks import Hook
from jaxdist.loop.trackers.hook import TrackerHook
from jaxdist.loop.trackers.mlflow_tracker import MlflowTracker

# key: (the module it needs, the extra that installs it)
NEEDS = {"tracking.mlflow": ("mlflow", "mlflow")}


def check_tracker_extras(config: Config) -> None:
    """Refuse (one line) a tracker that is turned on but whose client is not installed."""
    for key, (module, extra) in NEEDS.items():
        section, name = key.split(".")
        if getattr(getattr(config, section), name) and importlib.util.find_spec(module) is None:
            raise UserError(f"{key} needs {module}, which is not installed; pip install "
                            f"\"jaxdist[{extra}]\" (or leave {key} empty)")


def tracker_hooks(config: Config, experiment: str, primary: bool) -> list[Hook]:
    """The hooks of the trackers `config.tracking` turns on (process 0 alone has any)."""
    t = config.tracking
    if not primary or not t.mlflow:
        return []
    return [TrackerHook(MlflowTracker(t.mlflow, t.mlflow_experiment), experiment)]
