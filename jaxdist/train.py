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
from jaxdist.optimizers import build_optimizer
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

    def sync(self, step: int) -> None:
        """Bring the window's pending steps to the host and check their non-finite flags."""
        rows = self.window.sync(self.backend)
        first = step - len(rows) + 1
        for offset, row in enumerate(rows):
            self.guard.update(first + offset, row.get(NONFINITE, 0.0) > 0)

    def meta(self, loader_state: dict, eval_values: dict | None, stop_reason: str) -> dict:
        """Everything but the TrainState that a resumed run needs (JSON-able)."""
        return {"loader": loader_state, "train_examples": self.loader.size,
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
        self.loader.restore(meta["loader"])
        self.window.restore(meta["window"])
        self.early.restore(meta["early_stopping"])
        self.guard.restore(meta["nonfinite"])


def fit(experiment: Experiment, config: Config, workdir: Path | None = None,
        stream: TextIO | None = sys.stdout) -> TrainResult:
    """Train `experiment` as `config` says; log and checkpoint in `workdir` (if given)."""
    t = config.train
    backend = make_backend(config.parallel.backend, config.parallel.devices)
    loader = make_loader(experiment.train_data, config, backend.num_devices,
                         experiment.train_transform)
    run = _Run(config, backend, loader)
    per_device = loader.local_batch_size // backend.num_devices
    if per_device % t.grad_accum:
        raise UserError(f"train.grad_accum={t.grad_accum} does not divide the {per_device} "
                        f"examples each device gets per step; choose a divisor of "
                        f"{per_device} or change train.batch_size")
    tx = build_optimizer(config.optimizer, t.steps)
    init_key, state_key, train_key = jax.random.split(jax.random.key(t.seed), 3)
    model_state = (experiment.init_model_state(state_key) if experiment.has_state else None)
    host_state = jax.device_get(TrainState.create(experiment.init_params(init_key), tx,
                                                  train_key, model_state))
    primary = is_primary()  # process 0 alone writes logs and checkpoints
    logger = MetricsLogger(workdir if primary else None, stream if primary else None,
                           total_steps=t.steps)
    store, step, checkpoint, resumed_reason = None, 0, None, None
    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        c = config.checkpoint
        store = CheckpointStore(workdir / "checkpoints", c.keep, c.best_metric, c.best_mode,
                                writer=primary)
        step, host_state, resumed_reason = _resume(store, config, host_state, run, logger,
                                                   workdir)
        checkpoint = store.path(step) if step else None
        barrier("resume-read")  # every process has read config.json before it is replaced
        if primary:
            write_text_atomically(workdir / "config.json", to_json(config) + "\n")
    state = backend.replicate(host_state)
    if step >= t.steps or resumed_reason == "early_stopped":
        logger.close()
        if store is not None:
            store.close()
        return TrainResult(state, backend, logger.records, loader.state(), step,
                           "already_complete", checkpoint=checkpoint)

    train_step = backend.compile(make_train_step(
        experiment.loss_fn, tx, config.parallel.grad_reduce, t.skip_nonfinite,
        has_state=experiment.has_state, precision=t.precision, grad_accum=t.grad_accum))
    eval_step = None
    if experiment.eval_data is not None:
        eval_step = backend.compile(make_eval_step(
            experiment.evaluation_fn(), has_state=experiment.has_state,
            precision=t.precision), donate_state=False)

    def run_eval() -> dict[str, float]:
        values = evaluate(backend, eval_step, state, experiment.eval_data, t.batch_size)
        logger.log(step, "eval", values)
        return values

    def save(loader_state: dict, eval_values: dict | None, reason: str) -> Path | None:
        if store is None:
            return checkpoint
        run.sync(step)
        meta = run.meta(loader_state, eval_values, reason)
        path = store.save(step, backend.first_copy(state), meta)
        barrier(f"checkpoint-{step}")  # nobody reads or moves on before it is complete
        return path

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
                    logger.log(step, "train", run.window.summarize(backend))
                elif step == t.steps:
                    # Log the last partial window, but keep its sums for the checkpoint:
                    # a run resumed with more steps logs at step % log_every == 0 exactly
                    # as an uninterrupted run does.
                    run.sync(step)
                    partial = run.window.state()
                    logger.log(step, "train", run.window.summarize(backend))
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
                new_best = eval_values is not None and store is not None and store.improves(
                    eval_values)
                if (t.checkpoint_every and step % t.checkpoint_every == 0) or new_best or (
                        stop_reason != "completed"):
                    checkpoint = save(batches.state(), eval_values, stop_reason)
                if stop_reason != "completed":
                    break
            loader_state = batches.state()
        if stop_reason != "preempted":
            if eval_step is not None and eval_values is None:
                eval_values = run_eval()
            checkpoint = save(loader_state, eval_values, stop_reason)
        if stop_reason == "early_stopped":
            logger.say(f"early stopping at step {step}: eval {run.early.metric} has not "
                       f"improved for {run.early.patience} evaluations (best "
                       f"{run.early.best:.6g} at step {run.early.best_step})")
    finally:
        logger.close()
        if store is not None:
            store.close()
    return TrainResult(state, backend, logger.records, loader_state, step, stop_reason,
                       signal_name=watch.signal_name, checkpoint=checkpoint)


def _resume(store: CheckpointStore, config: Config, fresh: TrainState, run: _Run,
            logger: MetricsLogger, workdir: Path) -> tuple[int, TrainState, str | None]:
    """Continue from the newest checkpoint in `workdir`, if any: (step, state, stop reason)."""
    store.clean_incomplete()
    barrier("checkpoints-cleaned")
    store.best_step()  # read the checkpoints' metrics now, while no process writes
    step = store.latest()
    if step is None:
        saved = workdir / "config.json"
        if saved.exists():
            conflicts = resume_conflicts(json.loads(saved.read_text()), config)
            if conflicts:
                raise UserError(f"--workdir {workdir} holds a run with other settings "
                                f"({'; '.join(conflicts[:3])}); use those values or a new "
                                f"--workdir")
        logger.resume_at(0)  # a run that never saved starts over, and will log the same
        return 0, fresh, None
    meta = store.verify(step)
    conflicts = resume_conflicts(meta["config"], config)
    if conflicts:
        raise UserError(f"checkpoint {store.path(step)} was saved with other settings "
                        f"({'; '.join(conflicts[:3])}); resume with those values or use a new "
                        f"--workdir")
    state, meta = store.restore(step, fresh, meta)
    run.restore(meta)
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
