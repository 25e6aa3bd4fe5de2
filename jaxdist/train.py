"""The training loop: data -> step -> metrics -> evaluation -> checkpoint.

`fit` is an importable library function, so the same run works from a notebook, a test or
the CLI (`jaxdist.run`). Given a workdir, it holds the workdir's lock for the whole run,
resumes from the newest checkpoint there, and the resumed run logs exactly what an
uninterrupted one would.

A run has two parts. `_start` decides everything before the first step: the config as run,
the devices, the data, the workdir and what it holds, and every check that can refuse a
run (with one line), including tracing the train and eval steps without computing; in a
multi-process run the processes agree on its outcome, so an error on one stops all. Then
`_train` runs the loop; SIGTERM/SIGINT are honoured in it up to and including the final
evaluation and save.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

from jaxdist.agreement import agree, require_same_config
from jaxdist.checkpoint import CheckpointStore
from jaxdist.config import Config, flatten, resume_conflicts, to_dict, to_json
from jaxdist.data import DevicePrefetcher, Loader, as_source, eval_batches, training_loader
from jaxdist.dispatch import InFlightLimit
from jaxdist.distributed import any_process, barrier, is_primary
from jaxdist.errors import UserError
from jaxdist.experiment import Experiment
from jaxdist.files import write_text_atomically
from jaxdist.identity import data_fingerprint, identity_differences
from jaxdist.metrics import TIMING_KEYS, MetricsLogger, MetricWindow
from jaxdist.optimizers import build_optimizer, fix_schedule_horizon, learning_rate
from jaxdist.parallel import Backend, make_backend
from jaxdist.preemption import PreemptionWatch
from jaxdist.step import NONFINITE, WEIGHT_SUM, TrainState, make_eval_step, make_train_step
from jaxdist.stopping import EarlyStopping, NonfiniteGuard
from jaxdist.workdir import (
    WorkdirLock,
    newest_saved_step,
    prepare_workdir,
    record_saved_step,
    restart,
)

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
    # "completed", "already_complete", "early_stopped" or "preempted"
    stop_reason: str
    signal_name: str | None = None
    checkpoint: Path | None = None  # the last checkpoint written or restored

    @property
    def params(self) -> PyTree:
        """One copy of the final parameters, as numpy."""
        return self.backend.first_copy(self.state.params)

    def last(self, split: str) -> dict[str, Any]:
        """The last logged point of `split` (`train` or `eval`)."""
        return [r for r in self.records if r["split"] == split][-1]


class _Run:
    """The host-side state of one run that a checkpoint must carry besides the TrainState."""

    def __init__(self, config: Config, backend: Backend, loader: Loader,
                 identity: dict[str, Any]):
        t = config.train
        self.config, self.backend, self.loader = config, backend, loader
        self.identity = identity
        self.window = MetricWindow()
        self.early = EarlyStopping(t.early_stopping.patience, t.early_stopping.metric,
                                   t.early_stopping.mode, t.early_stopping.min_delta)
        self.guard = NonfiniteGuard(t.max_nonfinite)
        self.checkpoint: Path | None = None  # the newest checkpoint written or restored

    def sync(self, step: int) -> None:
        """Bring the window's pending steps to the host and check their non-finite flags."""
        for row in self.window.sync(self.backend):
            if self.guard.update(row[NONFINITE] > 0):
                raise UserError(self._nonfinite_message(step))

    def _nonfinite_message(self, step: int) -> str:
        skipped = " and were skipped" if self.config.train.skip_nonfinite else ""
        if self.checkpoint is None:
            return (f"{self.guard.run} steps in a row (up to step {step}) had a non-finite "
                    f"loss or gradient{skipped}; no checkpoint was saved. Lower "
                    f"optimizer.learning_rate, check the data for NaN/inf, or raise "
                    f"train.max_nonfinite, and start again")
        return (f"{self.guard.run} steps in a row (up to step {step}) had a non-finite loss "
                f"or gradient{skipped}; the newest checkpoint, {self.checkpoint}, is intact "
                f"(no checkpoint is written from non-finite parameters). To continue from "
                f"it with a lower rate, rerun with optimizer.learning_rate=LOWER "
                f"--allow-change optimizer.learning_rate (fit(..., allow_changes=...)); or "
                f"check the data for NaN/inf, or raise train.max_nonfinite")

    def meta(self, loader_state: dict, eval_values: dict | None, stop_reason: str) -> dict:
        """Everything but the TrainState that a resumed run needs (JSON-able)."""
        return {"loader": loader_state, "identity": self.identity,
                "devices": len(self.backend.global_devices),
                "window": self.window.state(),
                "early_stopping": self.early.state(), "nonfinite": self.guard.state(),
                "config": to_dict(self.config), "stop_reason": stop_reason,
                "eval": eval_values}

    def check_resumable(self, meta: dict, where: Path) -> None:
        """Refuse a checkpoint of another experiment, other data or another device count."""
        differences = identity_differences(meta.get("identity", {}), self.identity)
        if differences:
            raise UserError(f"checkpoint {where} was saved from other data: "
                            f"{'; '.join(differences)}; resume with the same experiment and "
                            f"data, or use a new --workdir")
        devices = len(self.backend.global_devices)
        if self.config.parallel.grad_reduce == "sum" and meta["devices"] != devices:
            raise UserError(f"parallel.grad_reduce=sum: the checkpoint was trained on "
                            f"{meta['devices']} devices and this run has {devices}; under sum "
                            f"the update grows with the device count, so resume on "
                            f"{meta['devices']} devices or use a new --workdir")

    def restore(self, meta: dict) -> None:
        """Continue from `meta()`."""
        self.loader.restore(meta["loader"])
        self.window.restore(meta["window"])
        self.early.restore(meta["early_stopping"])
        self.guard.restore(meta["nonfinite"])


@dataclass
class _SavedRun:
    """What a workdir already holds: its newest checkpoint (verified) or its config.json."""

    config: dict[str, Any]
    step: int | None = None  # the newest complete checkpoint, if any
    meta: dict[str, Any] | None = None


@dataclass
class _Start:
    """Everything decided before the first step."""

    config: Config
    backend: Backend
    loader: Loader
    tx: Any
    run: _Run
    host_state: TrainState  # fresh, or restored from the checkpoint
    step: int = 0
    resumed_meta: dict[str, Any] | None = None
    workdir: Path | None = None
    store: CheckpointStore | None = None
    lock: WorkdirLock | None = None
    eval_names: list[str] = field(default_factory=list)


def fit(experiment: Experiment, config: Config, workdir: Path | None = None,
        stream: TextIO | None = sys.stdout, *, start_over: bool = False,
        allow_changes: Sequence[str] = ()) -> TrainResult:
    """Train `experiment` as `config` says; log and checkpoint in `workdir` (if given).

    `start_over` first removes everything an earlier run wrote in `workdir`.
    `allow_changes` names config keys (e.g. `optimizer.learning_rate`) that may differ from
    the checkpoint's on resume; every other difference is refused.
    """
    start = agree("start", lambda: _start(experiment, config, workdir, start_over,
                                          allow_changes),
                  undo=lambda started: started.lock and started.lock.release())
    try:
        require_same_config({**flatten(to_dict(start.config)),
                             "experiment": start.run.identity})
        return _train(experiment, start, stream)
    finally:
        if start.store is not None:
            start.store.close()
        if start.lock is not None:
            start.lock.release()


def _start(experiment: Experiment, config: Config, workdir: Path | None, start_over: bool,
           allow_changes: Sequence[str]) -> _Start:
    """Decide and check everything a run needs before its first step (no collectives)."""
    t = config.train
    if t.precision != experiment.precision:
        raise UserError(f"train.precision={t.precision}, but the experiment's model computes "
                        f"in {experiment.precision} (Experiment.precision); its build() must "
                        f"make the model compute in "
                        f"jaxdist.precision.compute_dtype(config.train.precision) and say so "
                        f"in Experiment(precision=...), or use "
                        f"train.precision={experiment.precision}")
    if t.early_stopping.patience and experiment.eval_data is None:
        raise UserError("train.early_stopping.patience needs evaluation data, and this "
                        "experiment has none; set train.early_stopping.patience=0")
    backend = make_backend(config.parallel.backend, config.parallel.devices)
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
    lock, store, saved = None, None, None
    if workdir is not None:
        workdir = prepare_workdir(workdir)
        if is_primary():  # process 0 alone writes, so it alone holds the lock
            lock = WorkdirLock(workdir)
            lock.acquire()
    try:
        if workdir is not None:
            if start_over and lock is not None:
                restart(workdir)
            c = config.checkpoint
            store = CheckpointStore(workdir / "checkpoints", c.keep, c.best_metric,
                                    c.best_mode, writer=is_primary())
            saved = _saved_run(store, workdir)
        config = fix_schedule_horizon(config, saved and saved.config)
        tx = build_optimizer(config.optimizer)
        run = _Run(config, backend, loader, identity)
        init_key, state_key, train_key = jax.random.split(jax.random.key(t.seed), 3)
        model_state = experiment.init_model_state(state_key) if experiment.has_state else None
        host_state = jax.device_get(TrainState.create(experiment.init_params(init_key), tx,
                                                      train_key, model_state))
        start = _Start(config, backend, loader, tx, run, host_state, workdir=workdir,
                       store=store, lock=lock)
        start.eval_names = _check_steps(experiment, start)
        if saved is not None:
            _check_saved(start, saved, allow_changes)
        return start
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _check_steps(experiment: Experiment, start: _Start) -> list[str]:
    """Trace the train and eval steps without computing; return the eval metric names."""
    config, backend = start.config, start.backend
    batch = start.loader.peek()
    start.backend.trace(_train_step_fn(experiment, start), start.host_state, batch)
    if experiment.eval_data is None:
        return []
    first = next(eval_batches(experiment.eval_data, config.train.batch_size,
                              backend.num_devices, process_index=jax.process_index(),
                              process_count=jax.process_count()))
    sums = backend.trace(make_eval_step(experiment.evaluation_fn(),
                                        has_state=experiment.has_state),
                         start.host_state, first)
    names = [name for name in sums if name != WEIGHT_SUM]
    for key, metric in (("train.early_stopping.metric", config.train.early_stopping.metric),
                        ("checkpoint.best_metric", config.checkpoint.best_metric)):
        if key == "train.early_stopping.metric" and not config.train.early_stopping.patience:
            continue
        if metric and metric not in names:
            raise UserError(f"{key}={metric} is not an eval metric of this experiment; choose "
                            f"one of: {', '.join(names)}")
    return names


def _train_step_fn(experiment: Experiment, start: _Start) -> Callable:
    c = start.config
    return make_train_step(experiment.loss_fn, start.tx, c.parallel.grad_reduce,
                           c.train.skip_nonfinite, has_state=experiment.has_state,
                           grad_accum=c.train.grad_accum)


def _saved_run(store: CheckpointStore, workdir: Path) -> _SavedRun | None:
    """Read what `workdir` holds of an earlier run (verifying its newest checkpoint)."""
    store.clean_incomplete()
    store.best_step()  # read the checkpoints' metrics now, while no process writes
    step = store.latest()
    if step is not None:
        meta = store.verify(step)
        return _SavedRun(meta["config"], step, meta)
    saved = workdir / "config.json"
    if not saved.exists():
        return None
    try:
        config = json.loads(saved.read_text())
    except ValueError as error:
        raise UserError(f"{saved} is not valid JSON ({error.msg} at line {error.lineno}); "
                        f"restore it, or start over with --restart") from None
    if not isinstance(config, dict):
        raise UserError(f"{saved} does not hold a config (a JSON object); restore it, or "
                        f"start over with --restart")
    return _SavedRun(config)


def _check_saved(start: _Start, saved: _SavedRun, allow_changes: Sequence[str]) -> None:
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
    start.run.check_resumable(saved.meta, where)
    start.host_state, meta = start.store.restore(saved.step, start.host_state, saved.meta)
    start.run.restore(meta)
    start.run.checkpoint = where
    start.step, start.resumed_meta = saved.step, meta


def _train(experiment: Experiment, start: _Start, stream: TextIO | None) -> TrainResult:
    """Run the loop from `start` to the end, an early stop, or a signal."""
    config, backend, run, store = start.config, start.backend, start.run, start.store
    t, workdir, primary = config.train, start.workdir, is_primary()
    logger = MetricsLogger(workdir if primary else None, stream if primary else None,
                           total_steps=t.steps)
    step, meta = start.step, start.resumed_meta
    logger.resume_at(step)
    if meta is not None:
        logger.say(f"resumed from {run.checkpoint}")
    if workdir is not None:
        barrier("resume-read")  # every process has read config.json before it is replaced
        if primary:
            write_text_atomically(workdir / "config.json", to_json(config) + "\n")
    state = backend.replicate(start.host_state)
    has_eval = experiment.eval_data is not None
    finished = meta is not None and step >= t.steps and meta["stop_reason"] in (
        "completed", "early_stopped") and (meta["eval"] is not None or not has_eval)
    if finished or (meta is not None and meta["stop_reason"] == "early_stopped"):
        if meta["eval"] is not None and not any(
                r["step"] == step and r["split"] == "eval" for r in logger.records):
            logger.log(step, "eval", meta["eval"])  # its line was lost with a crash
        logger.close()
        return TrainResult(state, backend, config, logger.records, run.loader.state(), step,
                           "already_complete", checkpoint=run.checkpoint)

    train_step = backend.compile(_train_step_fn(experiment, start))
    eval_step = None
    if has_eval:
        eval_step = backend.compile(make_eval_step(
            experiment.evaluation_fn(), has_state=experiment.has_state), donate_state=False)

    def log_train() -> None:
        values = run.window.summarize(backend)
        values["lr"] = float(backend.first_copy(learning_rate(state.opt_state)))
        logger.log(step, "train", values)

    def run_eval(stop: Callable[[], bool] | None = None) -> dict[str, float] | None:
        values = evaluate(backend, eval_step, state, experiment.eval_data, t.batch_size, stop)
        if values is not None:
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
        run.checkpoint = store.save(step, host, run.meta(loader_state, eval_values, reason),
                                    replace=True)
        if primary:
            record_saved_step(workdir, step)
        barrier(f"checkpoint-{step}")  # nobody reads or moves on before it is complete

    stop_reason, eval_values, in_flight = "completed", None, InFlightLimit()
    single = jax.process_count() == 1
    logger.start_progress(step)
    try:
        with PreemptionWatch() as watch:
            with DevicePrefetcher(run.loader, backend.put_batch,
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
                        # a run resumed with more steps logs at step % log_every == 0
                        # exactly as an uninterrupted run does.
                        run.sync(step)
                        partial = run.window.state()
                        log_train()
                        run.window.restore(partial)
                    eval_values = None
                    if eval_step is not None and t.eval_every and step % t.eval_every == 0:
                        eval_values = run_eval()
                        if run.early.update(step, eval_values):
                            stop_reason = "early_stopped"
                    # Every process must stop after the same step: alone, at once; with
                    # peers, at the next log point, where they agree (one small all-gather).
                    if (watch.requested if single else (
                            step % t.log_every == 0 and any_process(watch.requested))):
                        stop_reason = "preempted"
                    if stop_reason != "completed":
                        save(batches.state(), eval_values, stop_reason)
                        break
                    # The last step's checkpoint is the end-of-run one, with the final eval.
                    new_best = eval_values is not None and store is not None and (
                        store.improves(eval_values))
                    if step < t.steps and (new_best or (
                            t.checkpoint_every and step % t.checkpoint_every == 0)):
                        save(batches.state(), eval_values, stop_reason)
                loader_state = batches.state()
            if stop_reason == "completed":
                # The final evaluation and save are part of the run: a signal during them
                # stops the evaluation, saves without it, and the rerun finishes the run.
                if eval_step is not None and eval_values is None:
                    eval_values = run_eval(
                        stop=(lambda: watch.requested) if single else None)
                    if eval_values is None:
                        stop_reason = "preempted"
                if stop_reason == "completed" and not single and any_process(watch.requested):
                    stop_reason = "preempted"
                save(loader_state, eval_values, stop_reason)
        if stop_reason == "early_stopped":
            logger.say(f"early stopping at step {step}: eval {run.early.metric} has not "
                       f"improved for {run.early.patience} evaluations (best "
                       f"{run.early.best:.6g} at step {run.early.best_step})")
    finally:
        logger.close()
    return TrainResult(state, backend, config, logger.records, loader_state, step, stop_reason,
                       signal_name=watch.signal_name, checkpoint=run.checkpoint)


def _all_finite(tree: PyTree) -> bool:
    """Whether every float leaf of a host tree is finite."""
    return all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(leaf).dtype, np.inexact))


def evaluate(backend: Backend, eval_step: Any, state: TrainState, data: Any,
             batch_size: int, stop: Callable[[], bool] | None = None
             ) -> dict[str, float] | None:
    """Exact weighted means of the loss and aux metrics over one pass of `data`.

    `stop()` is asked between batches; when it says so the pass ends early and None is
    returned.
    """
    window, in_flight = MetricWindow(), InFlightLimit()
    batches = eval_batches(data, batch_size, backend.num_devices,
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
    with DevicePrefetcher(batches, backend.put_batch) as device_batches:
        for batch in device_batches:
            if stop is not None and stop():
                return None
            sums = eval_step(state, batch)
            window.add(sums)
            in_flight.add(sums)
    values = window.summarize(backend)
    return {name: value for name, value in values.items() if name not in TIMING_KEYS}
