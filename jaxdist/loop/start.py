"""Everything a run decides and checks before its first step.

`prepare_run` resolves the config as run, picks the devices, builds the loader, takes the
workdir (its lock, what it holds) and makes every check that can refuse a run with one
line, including tracing the train and eval steps without computing; it restores a
checkpoint's state when there is one. It uses no collectives, so that in a multi-process
run the processes can agree on its outcome (`jaxdist.parallel.agreement.agree`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdist.base.config import Config, check_allowed_changes, resume_conflicts
from jaxdist.base.config.checks import validate
from jaxdist.base.errors import UserError
from jaxdist.base.schema import load_json
from jaxdist.checkpoints.identity import data_fingerprint, identity_differences
from jaxdist.checkpoints.integrity import RUN_META_SHAPE
from jaxdist.checkpoints.meta import RunMeta
from jaxdist.checkpoints.store import CheckpointStore
from jaxdist.checkpoints.workdir import WorkdirLock, newest_saved_step, prepare_workdir, restart
from jaxdist.data import Loader, as_source, eval_batches, training_loader
from jaxdist.loop.trackers import check_tracker_extras, preload_tracker_clients
from jaxdist.parallel.backend import AXIS, Backend
from jaxdist.parallel.backends import make_backend
from jaxdist.parallel.devices import free_memory_per_device
from jaxdist.parallel.layout import StateLayout, check_shard
from jaxdist.parallel.processes import is_primary
from jaxdist.step.experiment import Experiment
from jaxdist.step.leaves import check_loss_closure, check_model_state, check_params
from jaxdist.step.optimizers import build_optimizer, fix_schedule_horizon
from jaxdist.step.steps import WEIGHT_SUM, StepOptions, TrainState, make_eval_step, make_train_step


@dataclass
class SavedRun:
    """What a workdir already holds: its newest checkpoint (verified) or its config.json."""

    config: dict[str, Any]
    step: int | None = None  # the newest complete checkpoint, if any
    meta: dict[str, Any] | None = None


@dataclass(frozen=True)
class Resumed:
    """The checkpoint a run resumes from: its step, its meta and its folder."""

    step: int
    meta: RunMeta
    checkpoint: Path


@dataclass
class Start:
    """Everything decided before the first step."""

    config: Config
    backend: Backend
    loader: Loader
    tx: Any
    identity: dict[str, Any]  # what a checkpoint must match: the experiment, its data
    # Fresh, or restored from the checkpoint: logical (whole leaves) on the host, but for
    # the leaves a checkpoint held split, which come back split on the devices.
    host_state: TrainState
    layout: StateLayout  # how the state is split over the devices (parallel.shard)
    resumed: Resumed | None = None  # None for a fresh run
    # The compiled steps, built once and checked (traced) by `prepare_run`.
    train_step: Callable | None = None
    eval_step: Callable | None = None
    workdir: Path | None = None
    store: CheckpointStore | None = None
    lock: WorkdirLock | None = None
    removed: list[str] = field(default_factory=list)  # what --restart removed

    @property
    def step(self) -> int:
        """The step the run starts at: the resumed checkpoint's, or 0."""
        return 0 if self.resumed is None else self.resumed.step

    @property
    def resumed_meta(self) -> RunMeta | None:
        """The meta of the checkpoint resumed from, if any."""
        return None if self.resumed is None else self.resumed.meta

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint resumed from, if any."""
        return None if self.resumed is None else self.resumed.checkpoint


def prepare_run(experiment: Experiment, config: Config, workdir: Path | None, start_over: bool,
           allow_changes: Sequence[str]) -> Start:
    """Decide and check everything a run needs before its first step (no collectives).

    The caller releases `Start.lock` (and closes `Start.store`) when the run ends.
    """
    validate(config)  # a config changed in Python after `load` meets the CLI's checks
    check_allowed_changes(config, allow_changes)
    t = config.train
    if t.precision != experiment.precision:
        raise UserError(f"train.precision={t.precision}, but the experiment's model computes "
                        f"in {experiment.precision} (Experiment.precision); its build() must "
                        f"make the model compute in "
                        f"jaxdist.step.precision.compute_dtype(config.train.precision) and say so "
                        f"in Experiment(precision=...), or use "
                        f"train.precision={experiment.precision}")
    if t.early_stopping.patience and experiment.eval_data is None:
        raise UserError("train.early_stopping.patience needs evaluation data, and this "
                        "experiment has none; set train.early_stopping.patience=0")
    check_loss_closure(experiment.loss_fn)
    check_tracker_extras(config)
    if t.profile_steps and workdir is None:
        raise UserError(f"train.profile_steps={t.profile_steps} writes its trace to "
                        f"WORKDIR/profile; give a --workdir (fit(..., workdir=...))")
    if is_primary():  # process 0 alone talks to the trackers
        preload_tracker_clients(config)
    backend = make_backend(config.parallel.backend, config.parallel.devices)
    check_shard(config.parallel.shard)
    splits = config.parallel.shard != "none" and len(backend.global_devices) > 1
    loader = training_loader(experiment.train_data, config, backend.num_devices,
                             experiment.train_transform)
    if experiment.eval_data is not None:
        as_source(experiment.eval_data, "the evaluation data")  # refuses an empty one
    per_device = loader.local_batch_size // backend.num_devices
    if per_device % t.grad_accum:
        raise UserError(f"train.grad_accum={t.grad_accum} does not divide the {per_device} "
                        f"examples each device gets per step; choose a divisor of "
                        f"{per_device} or change train.batch_size")
    identity = {"experiment": experiment.name, "train_data": data_fingerprint(loader.source)}
    lock, store, saved, removed = None, None, None, []
    if workdir is not None:
        workdir = prepare_workdir(workdir)
        if is_primary():  # process 0 alone writes, so it alone holds the lock
            lock = WorkdirLock(workdir)
            lock.acquire()
    try:
        if workdir is not None:
            if start_over and lock is not None:
                removed = restart(workdir)
            c = config.checkpoint
            store = CheckpointStore(workdir / "checkpoints", c.keep, c.best_metric,
                                    c.best_mode, writer=is_primary())
            saved = _saved_run(store, workdir)
        config = fix_schedule_horizon(config, saved and saved.config)
        tx = build_optimizer(config.optimizer, across=AXIS if splits else None,
                             devices=len(backend.global_devices))
        host_state = initial_state(experiment, config, tx)
        layout = StateLayout(config.parallel.shard, host_state, tx, backend)
        start = Start(config, backend, loader, tx, identity, host_state, layout, workdir=workdir,
                      store=store, lock=lock, removed=removed)
        _check_steps(experiment, start)
        if saved is not None:
            _check_saved(start, saved, allow_changes)
        return start
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _check_prefetch(loader: Loader, backend: Backend, depth: int,
                    batch: dict[str, Any]) -> None:
    """Refuse a `loader.prefetch` whose placed batches would not fit in half the free memory.

    A full batch is placed once however deep the prefetch, so it is not counted again.
    """
    if loader.full:
        return
    per_device = sum(np.asarray(x).nbytes for x in batch.values()) / backend.num_devices
    free = free_memory_per_device(backend.devices)
    if free is None or (depth + 1) * per_device <= free / 2:
        return
    fits = max(int(free / 2 // max(per_device, 1)) - 1, 1)
    raise UserError(f"loader.prefetch={depth} keeps {depth} batches of {per_device / 2**20:.1f} "
                    f"MB placed on each device ahead of the step, more than half of the "
                    f"{free / 2**30:.2f} GiB free there; use loader.prefetch={min(fits, 2)} (at "
                    f"most {fits} fits)")


def _check_steps(experiment: Experiment, start: Start) -> None:
    """Trace the train and eval steps without computing, and check the eval metric names."""
    config, backend = start.config, start.backend
    batch = start.loader.peek()
    _check_prefetch(start.loader, backend, config.loader.prefetch, batch)
    layout = start.layout
    state, sharded = layout.split_shapes(start.host_state), layout.sharded_or_none
    start.train_step, _ = backend.compile_checked(train_step_fn(experiment, start), state,
                                                  batch, sharded)
    if experiment.eval_data is None:
        return
    first = next(eval_batches(experiment.eval_data, config.train.batch_size,
                              backend.num_devices, process_index=jax.process_index(),
                              process_count=jax.process_count()))
    start.eval_step, sums = backend.compile_checked(eval_step_fn(experiment, start), state,
                                                    first, sharded, donate_state=False)
    names = [name for name in sums if name != WEIGHT_SUM]
    for key, metric in (("train.early_stopping.metric", config.train.early_stopping.metric),
                        ("checkpoint.best_metric", config.checkpoint.best_metric)):
        if key == "train.early_stopping.metric" and not config.train.early_stopping.patience:
            continue
        if metric and metric not in names:
            raise UserError(f"{key}={metric} is not an eval metric of this experiment; choose "
                            f"one of: {', '.join(names)}")


def initial_state(experiment: Experiment, config: Config, tx: Any) -> TrainState:
    """A run's state at step 0, on the host: params, optimizer state, root key, model state."""
    init_key, state_key, train_key = jax.random.split(jax.random.key(config.train.seed), 3)
    model_state = experiment.init_model_state(state_key) if experiment.has_state else None
    params = experiment.init_params(init_key)
    check_params(params)
    check_model_state(model_state)
    return jax.device_get(TrainState.create(params, tx, train_key, model_state))


def step_options(experiment: Experiment, config: Config) -> StepOptions:
    """The train step's options that this run's config and experiment give."""
    t = config.train
    return StepOptions(grad_reduce=config.parallel.grad_reduce,
                       skip_nonfinite=t.skip_nonfinite, skip_with=t.skip_with,
                       grad_accum=t.grad_accum, gathers_params=experiment.gathers_params,
                       norms_every=t.log_every if t.log_norms else 0)


def train_step_fn(experiment: Experiment, start: Start) -> Callable:
    """The per-device train step of this run."""
    return make_train_step(experiment.loss_fn, start.tx, start.layout.strategy(),
                           step_options(experiment, start.config),
                           has_state=experiment.has_state)


def eval_step_fn(experiment: Experiment, start: Start) -> Callable:
    """The per-device evaluation step of this run."""
    return make_eval_step(experiment.evaluation_fn(), start.layout.strategy(),
                          has_state=experiment.has_state,
                          gathers_params=experiment.gathers_params)


def _saved_run(store: CheckpointStore, workdir: Path) -> SavedRun | None:
    """Read what `workdir` holds of an earlier run (verifying its newest checkpoint)."""
    store.clean_incomplete()
    store.best_step()  # read the checkpoints' metrics now, while no process writes
    step = store.latest()
    if step is not None:
        meta = store.verify(step, RUN_META_SHAPE)
        return SavedRun(meta["config"], step, meta)
    saved = workdir / "config.json"
    if not (saved.exists() or saved.is_symlink()):
        return None
    return SavedRun(load_json(saved, dict, "restore it, or start over with --restart"))


def _check_saved(start: Start, saved: SavedRun, allow_changes: Sequence[str]) -> None:
    """Refuse to continue what the workdir holds with other settings or other data."""
    workdir = start.workdir
    conflicts = resume_conflicts(saved.config, start.config, allow_changes)
    if saved.step is None:
        if conflicts:
            raise UserError(f"--workdir {workdir} holds a run with other settings "
                            f"({'; '.join(conflicts[:3])}); use those values, a new "
                            f"--workdir, or --restart")
        lost = newest_saved_step(workdir)
        if lost is not None and (workdir / "metrics.jsonl").exists():
            raise UserError(f"--workdir {workdir} had a checkpoint of step {lost} that is gone, "
                            f"so its metrics.jsonl cannot be continued; use a new --workdir, "
                            f"or --restart to start over on purpose")
        return
    where = start.store.path(saved.step)
    if conflicts:
        raise UserError(f"checkpoint {where} was saved with other settings "
                        f"({'; '.join(conflicts[:3])}); resume with those values, use a new "
                        f"--workdir, or allow the change with --allow-change KEY")
    resumed = RunMeta.from_json(saved.meta)
    _check_resumable(start, resumed, where)
    start.host_state, _ = start.store.restore(
        saved.step, start.host_state, saved.meta,
        placed=start.layout.restore_targets(start.backend))
    start.loader.restore(resumed.loader)  # the hooks' parts are theirs (fit)
    start.resumed = Resumed(saved.step, resumed, where)


def _check_resumable(start: Start, meta: RunMeta, where: Path) -> None:
    """Refuse a checkpoint of another experiment, other data or another device count."""
    differences = identity_differences(meta.identity, start.identity)
    if differences:
        raise UserError(f"checkpoint {where} was saved from other data: "
                        f"{'; '.join(differences)}; resume with the same experiment and "
                        f"data, or use a new --workdir")
    devices = len(start.backend.global_devices)
    if start.config.parallel.grad_reduce == "sum" and meta.devices != devices:
        raise UserError(f"parallel.grad_reduce=sum: the checkpoint was trained on "
                        f"{meta.devices} devices and this run has {devices}; under sum "
                        f"the update grows with the device count, so resume on "
                        f"{meta.devices} devices or use a new --workdir")
