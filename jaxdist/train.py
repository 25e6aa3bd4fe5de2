"""The training loop: data -> step -> metrics -> evaluation -> checkpoint.

`fit` is an importable library function, so the same run works from a notebook, a test or
the CLI (`jaxdist.run`). Given a workdir, it resumes from the newest checkpoint there, and
the resumed run logs exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

from jaxdist.checkpoint import CheckpointStore
from jaxdist.config import Config, resume_conflicts, to_dict, to_json
from jaxdist.data import (
    DevicePrefetcher,
    Loader,
    as_source,
    class_balanced_probabilities,
    column,
    eval_batches,
)
from jaxdist.distributed import any_process, barrier, is_primary
from jaxdist.errors import UserError
from jaxdist.experiment import Experiment
from jaxdist.files import write_text_atomically
from jaxdist.metrics import TIMING_KEYS, MetricsLogger, MetricWindow
from jaxdist.optimizers import build_optimizer, fix_schedule_horizon, learning_rate
from jaxdist.parallel import Backend, InFlightLimit, make_backend
from jaxdist.preemption import PreemptionWatch
from jaxdist.step import NONFINITE, TrainState, make_eval_step, make_train_step
from jaxdist.stopping import EarlyStopping, NonfiniteGuard

PyTree = Any


@dataclass
class TrainResult:
    """What a run leaves: its state on the devices, its logged points, why it stopped."""

    state: TrainState  # replicated on the backend's devices
    backend: Backend
    config: Config  # as run: the schedule's horizon resolved
    records: list[dict[str, Any]]
    loader_state: dict[str, int]  # the loader's position after the last step
    step: int
    stop_reason: str  # "completed", "already_complete", "early_stopped" or "preempted"
    signal_name: str | None = None
    checkpoint: Path | None = None  # the last checkpoint written or restored

    @property
    def params(self) -> PyTree:
        """One copy of the final parameters, as numpy."""
        return self.backend.first_copy(self.state.params)

    def last(self, split: str) -> dict[str, Any]:
        """The last logged point of `split` (`train` or `eval`)."""
        return [r for r in self.records if r["split"] == split][-1]


def make_loader(data: Any, config: Config, local_devices: int,
                transform: Any = None) -> Loader:
    """The training loader for this process, as `config.train` and `config.loader` say."""
    source = as_source(data, "training data")
    probabilities = None
    if config.loader.sampling == "balanced":
        if config.train.batch_size == 0:
            raise UserError("loader.sampling=balanced draws examples for each batch, but "
                            "train.batch_size=full uses every example once per step; set "
                            "train.batch_size=N or loader.sampling=uniform")
        probabilities = class_balanced_probabilities(column(source, config.loader.label_key))
    return Loader(source, config.train.batch_size, local_devices, seed=config.train.seed,
                  process_index=jax.process_index(), process_count=jax.process_count(),
                  shuffle=config.loader.shuffle, drop_remainder=config.loader.drop_remainder,
                  probabilities=probabilities, transform=transform)


class _Run:
    """The host-side state of one run that a checkpoint must carry besides the TrainState."""

    def __init__(self, config: Config, backend: Backend, loader: Loader):
        t = config.train
        self.config, self.backend, self.loader = config, backend, loader
        self.window = MetricWindow()
        self.early = EarlyStopping(t.early_stopping.patience, t.early_stopping.metric,
                                   t.early_stopping.mode, t.early_stopping.min_delta)
        self.guard = NonfiniteGuard(t.max_nonfinite)
        self.checkpoint: Path | None = None  # the newest checkpoint written or restored

    def sync(self, step: int) -> None:
        """Bring the window's pending steps to the host and check their non-finite flags."""
        rows = self.window.sync(self.backend)
        for row in rows:
            if self.guard.update(row[NONFINITE] > 0):
                skipped = " and were skipped" if self.config.train.skip_nonfinite else ""
                saved = (f"the newest checkpoint, {self.checkpoint}, is intact" if
                         self.checkpoint is not None else "no checkpoint was saved")
                raise UserError(
                    f"{self.guard.run} steps in a row (up to step {step}) had a non-finite "
                    f"loss or gradient{skipped}; {saved}. Lower optimizer.learning_rate, "
                    f"check the data for NaN/inf, or raise train.max_nonfinite")

    def meta(self, loader_state: dict, eval_values: dict | None, stop_reason: str) -> dict:
        """Everything but the TrainState that a resumed run needs (JSON-able)."""
        return {"loader": loader_state, "train_examples": self.loader.size,
                "devices": len(self.backend.global_devices),
                "window": self.window.state(),
                "early_stopping": self.early.state(), "nonfinite": self.guard.state(),
                "config": to_dict(self.config), "stop_reason": stop_reason,
                "eval": eval_values}

    def restore(self, meta: dict) -> None:
        """Continue from `meta()`."""
        if meta["train_examples"] != self.loader.size:
            raise UserError(f"the checkpoint was saved with {meta['train_examples']} training "
                            f"examples, the data now has {self.loader.size}; resume with the "
                            f"same data or use a new --workdir")
        devices = len(self.backend.global_devices)
        if self.config.parallel.grad_reduce == "sum" and meta["devices"] != devices:
            raise UserError(f"parallel.grad_reduce=sum: the checkpoint was trained on "
                            f"{meta['devices']} devices and this run has {devices}; under sum "
                            f"the update grows with the device count, so resume on "
                            f"{meta['devices']} devices or use a new --workdir")
        self.loader.restore(meta["loader"])
        self.window.restore(meta["window"])
        self.early.restore(meta["early_stopping"])
        self.guard.restore(meta["nonfinite"])


def fit(experiment: Experiment, config: Config, workdir: Path | None = None,
        stream: TextIO | None = sys.stdout) -> TrainResult:
    """Train `experiment` as `config` says; log and checkpoint in `workdir` (if given)."""
    t = config.train
    if t.precision != experiment.precision:
        raise UserError(f"train.precision={t.precision}, but the experiment's model computes "
                        f"in {experiment.precision} (Experiment.precision); its build() must "
                        f"make the model compute in "
                        f"jaxdist.precision.compute_dtype(config.train.precision) and say so "
                        f"in Experiment(precision=...), or use "
                        f"train.precision={experiment.precision}")
    backend = make_backend(config.parallel.backend, config.parallel.devices)
    loader = make_loader(experiment.train_data, config, backend.num_devices,
                         experiment.train_transform)
    per_device = loader.local_batch_size // backend.num_devices
    if per_device % t.grad_accum:
        raise UserError(f"train.grad_accum={t.grad_accum} does not divide the {per_device} "
                        f"examples each device gets per step; choose a divisor of "
                        f"{per_device} or change train.batch_size")
    primary = is_primary()  # process 0 alone writes logs and checkpoints
    logger = MetricsLogger(workdir if primary else None, stream if primary else None,
                           total_steps=t.steps)
    store, saved = None, None
    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        c = config.checkpoint
        store = CheckpointStore(workdir / "checkpoints", c.keep, c.best_metric, c.best_mode,
                                writer=primary)
        saved = _saved_run(store, workdir)
    config = fix_schedule_horizon(config, saved and saved.config)
    tx = build_optimizer(config.optimizer)
    run = _Run(config, backend, loader)
    init_key, state_key, train_key = jax.random.split(jax.random.key(t.seed), 3)
    model_state = (experiment.init_model_state(state_key) if experiment.has_state else None)
    host_state = jax.device_get(TrainState.create(experiment.init_params(init_key), tx,
                                                  train_key, model_state))
    step, resumed_reason = 0, None
    if workdir is not None:
        step, host_state, resumed_reason = _resume(store, saved, config, host_state, run,
                                                   logger, workdir)
        barrier("resume-read")  # every process has read config.json before it is replaced
        if primary:
            write_text_atomically(workdir / "config.json", to_json(config) + "\n")
    state = backend.replicate(host_state)
    if step >= t.steps or resumed_reason == "early_stopped":
        logger.close()
        if store is not None:
            store.close()
        return TrainResult(state, backend, config, logger.records, loader.state(), step,
                           "already_complete", checkpoint=run.checkpoint)

    train_step = backend.compile(make_train_step(
        experiment.loss_fn, tx, config.parallel.grad_reduce, t.skip_nonfinite,
        has_state=experiment.has_state, grad_accum=t.grad_accum))
    eval_step = None
    if experiment.eval_data is not None:
        eval_step = backend.compile(make_eval_step(
            experiment.evaluation_fn(), has_state=experiment.has_state), donate_state=False)

    def log_train() -> None:
        values = run.window.summarize(backend)
        values["lr"] = float(backend.first_copy(learning_rate(state.opt_state)))
        logger.log(step, "train", values)

    def run_eval() -> dict[str, float]:
        values = evaluate(backend, eval_step, state, experiment.eval_data, t.batch_size)
        logger.log(step, "eval", values)
        return values

    def save(loader_state: dict, eval_values: dict | None, reason: str) -> None:
        if store is None:
            return
        run.sync(step)
        host = backend.first_copy(state)
        if not _all_finite(host.params):
            logger.say(f"step {step}: no checkpoint saved, the parameters are not finite")
            return
        run.checkpoint = store.save(step, host, run.meta(loader_state, eval_values, reason))
        barrier(f"checkpoint-{step}")  # nobody reads or moves on before it is complete

    stop_reason, eval_values, in_flight = "completed", None, InFlightLimit()
    single = jax.process_count() == 1
    logger.start_progress(step)
    try:
        with PreemptionWatch() as watch, DevicePrefetcher(loader, backend.put_batch,
                                                          config.loader.prefetch) as batches:
            while step < t.steps:
                state, sums = train_step(state, next(batches))
                step += 1
                run.window.add(sums)
                in_flight.add(sums)
                logger.advance()
                if step % t.log_every == 0:
                    run.sync(step)
                    log_train()
                elif step == t.steps:
                    # Log the last partial window, but keep its sums for the checkpoint:
                    # a run resumed with more steps logs at step % log_every == 0 exactly
                    # as an uninterrupted run does.
                    run.sync(step)
                    partial = run.window.state()
                    log_train()
                    run.window.restore(partial)
                eval_values = None
                if eval_step is not None and t.eval_every and step % t.eval_every == 0:
                    eval_values = run_eval()
                    if run.early.update(step, eval_values):
                        stop_reason = "early_stopped"
                # Every process must stop after the same step: alone, at once; with peers,
                # at the next log point, where they agree (one small all-gather).
                if (watch.requested if single else (
                        step % t.log_every == 0 and any_process(watch.requested))):
                    stop_reason = "preempted"
                if stop_reason != "completed":
                    save(batches.state(), eval_values, stop_reason)
                    break
                # The last step's checkpoint is the end-of-run one below, with the final eval.
                new_best = eval_values is not None and store is not None and store.improves(
                    eval_values)
                if step < t.steps and (new_best or (
                        t.checkpoint_every and step % t.checkpoint_every == 0)):
                    save(batches.state(), eval_values, stop_reason)
            loader_state = batches.state()
        if stop_reason != "preempted":
            if eval_step is not None and eval_values is None:
                eval_values = run_eval()
            save(loader_state, eval_values, stop_reason)
        if stop_reason == "early_stopped":
            logger.say(f"early stopping at step {step}: eval {run.early.metric} has not "
                       f"improved for {run.early.patience} evaluations (best "
                       f"{run.early.best:.6g} at step {run.early.best_step})")
    finally:
        logger.close()
        if store is not None:
            store.close()
    return TrainResult(state, backend, config, logger.records, loader_state, step, stop_reason,
                       signal_name=watch.signal_name, checkpoint=run.checkpoint)


def _all_finite(tree: PyTree) -> bool:
    """Whether every float leaf of a host tree is finite."""
    return all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(leaf).dtype, np.inexact))


@dataclass
class _SavedRun:
    """What a workdir already holds: its newest checkpoint (verified) or its config.json."""

    config: dict[str, Any]
    step: int | None = None  # the newest complete checkpoint, if any
    meta: dict[str, Any] | None = None


def _saved_run(store: CheckpointStore, workdir: Path) -> _SavedRun | None:
    """Read what `workdir` holds of an earlier run, cleaning up interrupted saves first."""
    store.clean_incomplete()
    barrier("checkpoints-cleaned")
    store.best_step()  # read the checkpoints' metrics now, while no process writes
    step = store.latest()
    if step is not None:
        meta = store.verify(step)
        return _SavedRun(meta["config"], step, meta)
    saved = workdir / "config.json"
    if saved.exists():
        return _SavedRun(json.loads(saved.read_text()))
    return None


def _resume(store: CheckpointStore, saved: _SavedRun | None, config: Config,
            fresh: TrainState, run: _Run, logger: MetricsLogger,
            workdir: Path) -> tuple[int, TrainState, str | None]:
    """Continue from the newest checkpoint in `workdir`, if any: (step, state, stop reason)."""
    conflicts = resume_conflicts(saved.config, config) if saved is not None else []
    if saved is None or saved.step is None:
        if conflicts:
            raise UserError(f"--workdir {workdir} holds a run with other settings "
                            f"({'; '.join(conflicts[:3])}); use those values or a new "
                            f"--workdir")
        logger.resume_at(0)  # a run that never saved starts over, and will log the same
        return 0, fresh, None
    step = saved.step
    if conflicts:
        raise UserError(f"checkpoint {store.path(step)} was saved with other settings "
                        f"({'; '.join(conflicts[:3])}); resume with those values or use a new "
                        f"--workdir")
    state, meta = store.restore(step, fresh, saved.meta)
    run.restore(meta)
    run.checkpoint = store.path(step)
    logger.resume_at(step)
    logger.say(f"resumed from {store.path(step)}")
    return step, state, meta.get("stop_reason")


def evaluate(backend: Backend, eval_step: Any, state: TrainState, data: Any,
             batch_size: int) -> dict[str, float]:
    """Exact weighted means of the loss and aux metrics over one pass of `data`."""
    window, in_flight = MetricWindow(), InFlightLimit()
    batches = eval_batches(data, batch_size, backend.num_devices,
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
    with DevicePrefetcher(batches, backend.put_batch) as device_batches:
        for batch in device_batches:
            sums = eval_step(state, batch)
            window.add(sums)
            in_flight.add(sums)
    values = window.summarize(backend)
    return {name: value for name, value in values.items() if name not in TIMING_KEYS}
