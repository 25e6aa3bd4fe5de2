"""A run read back from its workdir: its experiment, config and checkpointed state.

The experiment is the one `config.json` names; the state is that of the newest or the best
checkpoint. For tools that use a trained model (`python -m jaxdist.explain`, a notebook)
without training it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jaxdist.base.config import EXPERIMENT_DIGEST_KEY, EXPERIMENT_KEY, Config, from_dict
from jaxdist.base.errors import UserError
from jaxdist.base.schema import check, load_json
from jaxdist.checkpoints.store import CheckpointStore
from jaxdist.loop.discovery import file_digest, is_file_reference, load_experiment, name_experiment
from jaxdist.loop.start import initial_state
from jaxdist.step.experiment import Experiment
from jaxdist.step.optimizers import build_optimizer
from jaxdist.step.steps import TrainState


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

    @property
    def module(self) -> Any:
        """The user's own module holding the checkpoint's params (evaluation mode).

        For an experiment of `jaxdist.from_nnx` or `jaxdist.from_equinox`; None otherwise.
        """
        module_of = self.experiment.module_of
        return None if module_of is None else module_of(self.params, self.model_state)


def restore_run(workdir: Path, checkpoint: Literal["newest", "best"] = "newest",
                experiment: str | None = None, trust_workdir: bool = False) -> RestoredRun:
    """Read `workdir`'s experiment, config and `checkpoint` back (one line if it cannot).

    A workdir is data: the experiment its `config.json` names is loaded only if it is a
    bundled one. An experiment file runs only when the caller names it (`experiment`, a
    name or a path, the user's own choice), or with `trust_workdir` when the file at the
    recorded path still has the sha256 recorded when the run was trained.
    """
    workdir = Path(workdir)
    path = workdir / "config.json"
    if not path.is_file():
        raise UserError(f"{workdir} holds no config.json; give the --workdir of a jaxdist run")
    saved = load_json(path, dict, "give the --workdir of a jaxdist run")
    source = experiment
    if source is None:
        if EXPERIMENT_KEY not in saved:
            raise UserError(f"{path} does not name its experiment (a run written by an older "
                            f"jaxdist); name it with --experiment NAME_OR_PATH")
        check(saved, {EXPERIMENT_KEY: str}, str(path), "give the --workdir of a jaxdist run")
        source = trusted_source(path, saved[EXPERIMENT_KEY], saved.get(EXPERIMENT_DIGEST_KEY),
                                trust_workdir)
    module = load_experiment(source)
    config = from_dict(module.config(), saved)
    built = name_experiment(module.build(config), source)
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
        template = initial_state(built, config, build_optimizer(config.optimizer))
        state, _ = store.restore(step, template)
    finally:
        store.close()
    return RestoredRun(built, config, state, step, store.path(step))


def trusted_source(config_path: Path, recorded: str, digest: Any, trust: bool) -> str:
    """The experiment a workdir's `config.json` names, if loading it runs no stranger's code.

    A bundled name is loaded from `experiments/`; a file only with `trust` and a matching
    recorded sha256.
    """
    if not is_file_reference(recorded):
        return recorded
    advice = (f"jaxdist does not run code that a workdir names; to run that file, name it "
              f"yourself with --experiment {recorded}")
    if not trust:
        raise UserError(f"{config_path} names the experiment file {recorded}: {advice} (or "
                        f"pass --trust-workdir if you trust whoever wrote this workdir)")
    try:
        found = file_digest(recorded)
    except OSError as error:
        raise UserError(f"{config_path} names the experiment file {recorded}, which cannot be "
                        f"read ({error.strerror}); give the experiment with --experiment "
                        f"PATH") from None
    if not isinstance(digest, str) or found != digest:
        why = ("has no sha256 recorded for it" if not isinstance(digest, str) else
               "records another sha256 for it: the file changed since the run was trained")
        raise UserError(f"{config_path} names the experiment file {recorded} but {why}; "
                        f"{advice}")
    return recorded
