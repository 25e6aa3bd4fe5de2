"""A run read back from its workdir: its experiment, config and checkpointed state.

The experiment is the one `config.json` names; the state is that of the newest or the best
checkpoint. For tools that use a trained model (`python -m jaxdist.explain`, a notebook)
without training it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jaxdist.checkpoint import CheckpointStore
from jaxdist.config import EXPERIMENT_KEY, Config, from_dict
from jaxdist.discovery import load_experiment, name_experiment
from jaxdist.errors import UserError
from jaxdist.experiment import Experiment
from jaxdist.optimizers import build_optimizer
from jaxdist.start import initial_state
from jaxdist.step import TrainState


@dataclass
class RestoredRun:
    """An experiment with the state of one of its checkpoints (host numpy arrays)."""

    experiment: Experiment
    config: Config
    state: TrainState
    step: int
    checkpoint: Path

    @property
    def params(self) -> Any:
        """The checkpoint's parameters."""
        return self.state.params

    @property
    def model_state(self) -> Any:
        """The checkpoint's model state (e.g. BatchNorm statistics), or None."""
        return self.state.model_state


def restore_run(workdir: Path, checkpoint: Literal["newest", "best"] = "newest") -> RestoredRun:
    """Read `workdir`'s experiment, config and `checkpoint` back (one line if it cannot)."""
    workdir = Path(workdir)
    path = workdir / "config.json"
    if not path.is_file():
        raise UserError(f"{workdir} holds no config.json; give the --workdir of a jaxdist run")
    try:
        saved = json.loads(path.read_text())
    except ValueError as error:
        raise UserError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None
    source = saved.get(EXPERIMENT_KEY) if isinstance(saved, dict) else None
    if not source:
        raise UserError(f"{path} does not name its experiment (a run written before "
                        f"2026-11-27); train it again with python -m jaxdist.run")
    module = load_experiment(source)
    config = from_dict(module.config(), saved)
    experiment = name_experiment(module.build(config), source)
    c = config.checkpoint
    store = CheckpointStore(workdir / "checkpoints", c.keep, c.best_metric, c.best_mode,
                            writer=False)
    try:
        step = store.latest() if checkpoint == "newest" else store.best_step()
        if step is None:
            what = "no checkpoint" if checkpoint == "newest" or store.latest() is None else (
                f"no checkpoint with an eval {c.best_metric} (the best one)")
            raise UserError(f"{workdir} holds {what} yet; train it first (python -m "
                            f"jaxdist.run {source} --workdir {workdir})")
        template = initial_state(experiment, config, build_optimizer(config.optimizer))
        state, _ = store.restore(step, template)
    finally:
        store.close()
    return RestoredRun(experiment, config, state, step, store.path(step))
