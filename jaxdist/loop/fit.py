"""The training loop: data -> step -> metrics -> evaluation -> checkpoint.

`fit` is an importable library function, so the same run works from a notebook, a test or
the CLI (`jaxdist.run`). Given a workdir, it holds the workdir's lock for the whole run,
resumes from the newest checkpoint there, and the resumed run logs exactly what an
uninterrupted one would.

A run has two parts. `jaxdist.loop.start.prepare_run` decides everything before the first step
and makes every check that can refuse a run (with one line); in a multi-process run the
processes agree on its outcome, so an error on one stops all. Then `_train` runs the loop;
SIGTERM/SIGINT are honoured in it up to and including the final evaluation and save.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from jaxdist.base.errors import UserError
from jaxdist.base.files import write_text_atomically
from jaxdist.base.pytree import PyTree
from jaxdist.checkpoints.integrity import MANIFEST, sha256_file
from jaxdist.checkpoints.saving import CheckpointWriter
from jaxdist.checkpoints.workdir import record_saved_step, require_same_resume, require_same_workdir
from jaxdist.config import Config, flatten, to_dict, to_json
from jaxdist.data import DevicePrefetcher, eval_batches
from jaxdist.loop.compile_cache import FirstStepTimer
from jaxdist.loop.discovery import file_digest
from jaxdist.loop.metrics import TIMING_KEYS, MetricsLogger, MetricWindow
from jaxdist.loop.preemption import PreemptionWatch
from jaxdist.loop.start import Start, eval_step_fn, prepare_run, train_step_fn
from jaxdist.parallel.agreement import agree, require_same_config
from jaxdist.parallel.backend import Backend
from jaxdist.parallel.dispatch import InFlightLimit, host_reads
from jaxdist.parallel.layout import StateLayout
from jaxdist.parallel.processes import barrier, first_signal, is_primary
from jaxdist.step.experiment import Experiment
from jaxdist.step.optimizers import learning_rate
from jaxdist.step.steps import TrainState


@dataclass
class TrainResult:
    """What a run leaves: its state on the devices, its logged points, why it stopped."""

    state: TrainState  # on the backend's devices, split as `layout` says
    backend: Backend
    config: Config  # as run: the schedule's horizon resolved
    records: list[dict[str, Any]]
    loader_state: dict[str, int]  # the loader's position after the last step
    step: int
    # "completed", "already_complete", "early_stopped" or "preempted"
    stop_reason: str
    signal_name: str | None = None  # what stopped a preempted run, e.g. "SIGTERM to process 1"
    checkpoint: Path | None = None  # the last checkpoint written or restored
    layout: StateLayout | None = None  # None: replicated

    @property
    def params(self) -> PyTree:
        """One copy of the final parameters (whole leaves), as numpy."""
        if self.layout is not None:
            return self.layout.params_to_host(self.backend, self.state.params)
        return self.backend.first_copy(self.state.params)

    def last(self, split: str) -> dict[str, Any]:
        """The last logged point of `split` (`train` or `eval`)."""
        return [r for r in self.records if r["split"] == split][-1]

    def history(self, split: str = "train") -> dict[str, np.ndarray]:
        """Every logged value of `split` as an array over its points, "step" included."""
        points = [r for r in self.records if r["split"] == split]
        names = [name for name in points[0] if name != "split"] if points else []
        return {name: np.array([p.get(name, np.nan) for p in points], np.float64
                               if name != "step" else np.int64) for name in names}

    def __repr__(self) -> str:
        shown = [f"step={self.step}", f"stop_reason={self.stop_reason!r}"]
        for split in ("train", "eval"):
            if any(r["split"] == split for r in self.records):
                shown.append(f"{split}_loss={self.last(split)['loss']:.6g}")
        if self.checkpoint is not None:
            shown.append(f"checkpoint='{self.checkpoint}'")
        return f"TrainResult({', '.join(shown)})"


def fit(experiment: Experiment, config: Config, workdir: Path | None = None,
        stream: TextIO | None = sys.stdout, *, start_over: bool = False,
        allow_changes: Sequence[str] = ()) -> TrainResult:
    """Train `experiment` as `config` says; log and checkpoint in `workdir` (if given).

    `start_over` first removes everything an earlier run wrote in `workdir`.
    `allow_changes` names config keys (e.g. `optimizer.learning_rate`) that may differ from
    the checkpoint's on resume; every other difference is refused.
    """
    if isinstance(workdir, str) and not workdir.strip():
        raise UserError(f"the workdir {workdir!r} is empty; give a folder (a new one for a new "
                        f"run)")
    with host_reads():  # start-up reads and writes device values freely
        start = agree("start", lambda: prepare_run(experiment, config, workdir, start_over,
                                                   allow_changes),
                      undo=lambda started: started.lock and started.lock.release())
    try:
        require_same_workdir(start.workdir, start.lock and start.lock.token)
        require_same_resume(_resume_name(start))
        require_same_config({**flatten(to_dict(start.config)),
                             "experiment": start.run.identity})
        return _train(experiment, start, stream)
    finally:
        if start.store is not None:
            start.store.close()
        if start.lock is not None:
            start.lock.release()


def _resume_name(start: Start) -> str:
    """What this process resumes: a checkpoint and its manifest's sha256, or nothing."""
    if start.resumed_meta is None:
        return "nothing"
    path = start.store.path(start.step)
    return f"{path.name} (manifest sha256 {sha256_file(path / MANIFEST)[:16]})"


def _train(experiment: Experiment, start: Start, stream: TextIO | None) -> TrainResult:
    """Run the loop from `start` to the end, an early stop, or a signal."""
    config, backend, run, store = start.config, start.backend, start.run, start.store
    t, workdir, primary = config.train, start.workdir, is_primary()
    logger = MetricsLogger(workdir if primary else None, stream if primary else None,
                           total_steps=t.steps)
    step, meta = start.step, start.resumed_meta
    logger.resume_at(step)
    if start.removed:
        logger.say(f"--restart removed {', '.join(start.removed)} from {workdir}")
    if meta is not None:
        logger.say(f"resumed from {run.checkpoint}")
    if workdir is not None:
        barrier("resume-read")  # every process has read config.json before it is replaced
        if primary:
            source = experiment.source or experiment.name
            write_text_atomically(workdir / "config.json", to_json(
                config, source, _digest_or_none(source)) + "\n")
    layout = start.layout
    state = layout.to_devices(backend, start.host_state)
    has_eval = experiment.eval_data is not None
    finished = meta is not None and step >= t.steps and meta["stop_reason"] in (
        "completed", "early_stopped") and (meta["eval"] is not None or not has_eval)
    if finished or (meta is not None and meta["stop_reason"] == "early_stopped"):
        if meta["eval"] is not None and not any(
                r["step"] == step and r["split"] == "eval" for r in logger.records):
            logger.log(step, "eval", meta["eval"])  # its line was lost with a crash
        logger.close()
        return TrainResult(state, backend, config, logger.records, run.loader.state(), step,
                           "already_complete", checkpoint=run.checkpoint, layout=layout)

    # Both steps were traced, and so checked, before the first step (`prepare_run`).
    sharded = layout.sharded_or_none
    train_step = backend.compile(train_step_fn(experiment, start), traced=True,
                                 sharded=sharded)
    eval_step = None
    if has_eval:
        eval_step = backend.compile(eval_step_fn(experiment, start), donate_state=False,
                                    traced=True, sharded=sharded)

    def log_train() -> None:
        print_news()
        # The window's metrics and the learning rate come back in one transfer.
        lr = run.sync(step, also=learning_rate(state.opt_state))
        values = run.window.summarize(backend)
        values["lr"] = float(lr)
        logger.log(step, "train", values)

    def run_eval(stop: Callable[[], bool] | None = None) -> dict[str, float] | None:
        values = evaluate(backend, eval_step, state, experiment.eval_data, t.batch_size, stop)
        if values is not None:
            logger.log(step, "eval", values)
        return values

    writer = None if store is None else CheckpointWriter(store, config.checkpoint.background)
    if writer is not None:  # a report of the newest checkpoint waits for the one in flight
        run.settle = lambda: writer.wait(raise_error=False)
    saving: list[int] = []  # the step of the save in flight
    news: list[str] = []  # what the writer finished, printed by the loop

    def committed(saved_step: int, copied: float) -> Callable[[Path, float], None]:
        def done(path: Path, seconds: float) -> None:  # in the writer's thread, maybe
            run.checkpoint = path
            if primary:
                record_saved_step(workdir, saved_step)
            where = " in the background" if writer.background else ""
            news.append(f"saved {path.name}: {copied:.2f} s to copy it to the host, then "
                        f"{seconds:.2f} s to write it{where}")
        return done

    def finish_saving() -> None:
        writer.wait()
        for saved_step in saving:
            barrier(f"checkpoint-{saved_step}")  # nobody reads or moves on before it is done
        saving.clear()
        print_news()

    def print_news() -> None:
        while news:
            logger.say(news.pop(0))

    def save(loader_state: dict, eval_values: dict | None, reason: str,
             last: bool = False) -> None:
        """Save a checkpoint of this step; the `last` one of the run is waited for."""
        if store is None:
            return
        run.sync(step)
        started = time.perf_counter()
        with host_reads():
            form = layout.checkpoint_form(backend, state)
            finite = _all_finite(form.params)
        if not finite:
            logger.say(f"step {step}: no checkpoint saved, the parameters are not finite")
            return
        finish_saving()
        if start.lock is not None:
            start.lock.check()  # the workdir is still this run's alone
        with host_reads():
            writer.save(step, form, run.meta(loader_state, eval_values, reason),
                        committed(step, time.perf_counter() - started), logical=layout.logical,
                        split=layout.split_leaves())
        saving.append(step)
        if last:
            finish_saving()

    stop_reason, eval_values, in_flight = "completed", None, InFlightLimit()
    stopped_by = None  # the signal that stopped the run ("SIGTERM to process 1" from a peer)
    single = jax.process_count() == 1
    first_step = FirstStepTimer()
    logger.start_progress(step)
    try:
        with PreemptionWatch() as watch:
            with DevicePrefetcher(run.loader, backend.put_batch,
                                  config.loader.prefetch) as batches:
                while step < t.steps:
                    state, sums = train_step(state, next(batches))
                    if first_step.pending:
                        logger.say(first_step.report(sums))
                    step += 1
                    run.window.add(sums)
                    in_flight.add(sums)
                    logger.advance()
                    if step % t.log_every == 0:
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
                    if single and watch.requested:
                        stop_reason, stopped_by = "preempted", watch.signal_name
                    elif not single and step % t.log_every == 0:
                        stopped_by = first_signal(watch.signal_name)
                        if stopped_by is not None:
                            stop_reason = "preempted"
                    if stop_reason != "completed":
                        save(batches.state(), eval_values, stop_reason, last=True)
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
                if stop_reason == "completed" and not single:
                    stopped_by = first_signal(watch.signal_name)
                    if stopped_by is not None:
                        stop_reason = "preempted"
                elif stop_reason == "preempted":
                    stopped_by = watch.signal_name
                save(loader_state, eval_values, stop_reason, last=True)
        if writer is not None:
            finish_saving()  # e.g. when the last save was skipped (non-finite parameters)
        if stop_reason == "early_stopped":
            logger.say(f"early stopping at step {step}: eval {run.early.metric} has not "
                       f"improved for {run.early.patience} evaluations (best "
                       f"{run.early.best:.6g} at step {run.early.best_step})")
    except BaseException:
        if writer is not None:  # a save in flight is finished, whatever stopped the run
            writer.wait(raise_error=False)
        logger.close(raise_error=False)
        raise
    finally:
        logger.close()
    return TrainResult(state, backend, config, logger.records, loader_state, step, stop_reason,
                       signal_name=stopped_by, checkpoint=run.checkpoint,
                       layout=layout)


def _digest_or_none(source: str) -> str | None:
    """The sha256 of the experiment file `source` (None: a bundled name, or unreadable)."""
    try:
        return file_digest(source)
    except OSError:
        return None


def _all_finite(tree: PyTree) -> bool:
    """Whether every float leaf of a tree of host and global arrays is finite.

    A global array (split over the devices of every process) is checked where it lies,
    by every process alike.
    """
    return all(bool(_finite(leaf)) if isinstance(leaf, jax.Array) else np.isfinite(leaf).all()
               for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact))


@jax.jit
def _finite(x: jax.Array) -> jax.Array:
    return jnp.isfinite(x).all()


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
    values = window.summarize(backend)  # one transfer for the whole pass
    return {name: value for name, value in values.items() if name not in TIMING_KEYS}
