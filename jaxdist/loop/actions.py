"""The loop's own hooks, each one action of a run (`default_hooks` orders them).

The progress line, train points, the non-finite guard, evaluation, signals, checkpoints
and early stopping. Each owns its state; those a resumed run must continue (the non-finite
count, the early stopping rule) keep it in every checkpoint through `Hook.state()` /
`Hook.restore()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdist.base.config import Config
from jaxdist.base.errors import UserError
from jaxdist.base.pytree import PyTree
from jaxdist.checkpoints.meta import RunMeta
from jaxdist.checkpoints.saving import CheckpointWriter
from jaxdist.checkpoints.store import CheckpointStore
from jaxdist.checkpoints.workdir import WorkdirLock, record_saved_step
from jaxdist.data import DevicePrefetcher, eval_batches
from jaxdist.loop.compile_cache import FirstStepTimer
from jaxdist.loop.hooks import Hook, Run
from jaxdist.loop.metrics import TIMING_KEYS, MetricWindow
from jaxdist.loop.stopping import EarlyStopping, NonfiniteGuard
from jaxdist.parallel.backend import Backend
from jaxdist.parallel.dispatch import InFlightLimit, host_reads
from jaxdist.parallel.processes import barrier, first_signal, is_primary
from jaxdist.step.norms import NORM_KEYS
from jaxdist.step.optimizers import learning_rate
from jaxdist.step.steps import NONFINITE, TrainState


class ShowProgress(Hook):
    """The live progress line, and how long the first step took (compiling included)."""

    def on_start(self, run: Run) -> None:
        """Start timing the first step and show the progress line (saying it compiles)."""
        self._first_step = FirstStepTimer()
        run.logger.start_progress(run.step)
        if run.logger.progress is not None:
            run.logger.progress.note("compiling the first step")

    def after_step(self, run: Run, sums: dict[str, jax.Array]) -> None:
        """Count the step (reporting the first one)."""
        if self._first_step.pending:
            run.logger.say(self._first_step.report(sums))
            if run.logger.progress is not None:
                run.logger.progress.note("")
        run.logger.advance()


class LogTraining(Hook):
    """A train point every `log_every` steps and after the last step."""

    def __init__(self, log_every: int, steps: int):
        self.log_every, self.steps = log_every, steps

    def after_step(self, run: Run, sums: dict[str, jax.Array]) -> None:
        """Add the step to the window; log the window at a log point."""
        run.window.add(sums)
        if run.step % self.log_every == 0:
            self._log(run)
        elif run.step == self.steps:
            # Log the last partial window, but keep its sums for the checkpoint: a run
            # resumed with more steps logs at step % log_every == 0 exactly as an
            # uninterrupted run does.
            # Its last step measured no norms (they are measured every `log_every` steps).
            run.sync()
            partial = run.window.state()
            self._log(run, norms=False)
            run.window.restore(partial)

    def _log(self, run: Run, norms: bool = True) -> None:
        # The window's metrics and the learning rate come back in one transfer.
        lr = run.sync(also=learning_rate(run.state.opt_state))
        values = run.window.summarize(run.backend)
        if not norms:
            values = {name: value for name, value in values.items() if name not in NORM_KEYS}
        values["lr"] = float(lr)
        run.log("train", values)


class GuardNonfinite(Hook):
    """Ends the run (one line) after `limit` steps in a row with a non-finite loss or grad."""

    key = "nonfinite"

    def __init__(self, limit: int, skipped: bool):
        self.guard, self.skipped = NonfiniteGuard(limit), skipped

    def after_sync(self, run: Run, rows: list[dict[str, float]]) -> None:
        """Follow each step's flag; refuse to go on once too many came in a row."""
        for row in rows:
            if self.guard.update(row[NONFINITE] > 0):
                run.settle()  # the newest checkpoint named below is the one in flight
                raise UserError(self._message(run))

    def _message(self, run: Run) -> str:
        skipped = " and were skipped" if self.skipped else ""
        data = ("check the data for NaN/inf (and, for a cross-entropy loss, for labels "
                "outside the model's classes, which give NaN)")
        steps = f"{self.guard.run} steps in a row (up to step {run.step})"
        if run.checkpoint is None:
            return (f"{steps} had a non-finite loss or gradient{skipped}; no checkpoint was "
                    f"saved. Lower optimizer.learning_rate, {data}, or raise "
                    f"train.max_nonfinite, and start again")
        return (f"{steps} had a non-finite loss or gradient{skipped}; the newest checkpoint, "
                f"{run.checkpoint}, is intact (no checkpoint is written from non-finite "
                f"parameters). To continue from it with a lower rate, rerun with "
                f"optimizer.learning_rate=LOWER --allow-change optimizer.learning_rate "
                f"(fit(..., allow_changes=...)); or {data}, or raise train.max_nonfinite")

    def state(self) -> dict[str, Any]:
        """The count of non-finite steps in a row."""
        return self.guard.state()

    def restore(self, state: dict[str, Any]) -> None:
        """Continue the count."""
        self.guard.restore(state)


class Evaluate(Hook):
    """An evaluation every `eval_every` steps, and one at the end if the last step had none.

    A signal during the final evaluation (one process) stops it, and the run is preempted.
    """

    def __init__(self, eval_step: Callable, data: Any, batch_size: int, eval_every: int):
        self.eval_step, self.data = eval_step, data
        self.batch_size, self.eval_every = batch_size, eval_every

    def after_step(self, run: Run, sums: dict[str, jax.Array]) -> None:
        """Evaluate at an eval point."""
        run.eval_values = None
        if self.eval_every and run.step % self.eval_every == 0:
            self._evaluate(run)

    def on_stop(self, run: Run) -> None:
        """The final evaluation of a run that reached its last step."""
        if run.stop_reason is not None or run.eval_values is not None:
            return
        single = jax.process_count() == 1
        if not self._evaluate(run, stop=(lambda: run.signal_requested() is not None)
                              if single else None):
            run.request_stop("preempted", run.signal_requested())

    def _evaluate(self, run: Run, stop: Callable[[], bool] | None = None) -> bool:
        values = evaluate(run.backend, self.eval_step, run.state, self.data, self.batch_size,
                          stop)
        run.eval_values = values
        if values is not None:
            run.log("eval", values)
        return values is not None


class StopEarly(Hook):
    """Stops the run when an eval metric has not improved for `patience` evaluations."""

    key = "early_stopping"

    def __init__(self, rule: EarlyStopping):
        self.rule = rule
        self._stopped = False

    def after_log(self, run: Run, split: str, values: dict[str, float]) -> None:
        """Follow the eval metric (of the evaluations during the loop, not the final one)."""
        if split == "eval" and not run.ending and self.rule.update(run.step, values):
            run.request_stop("early_stopped")
            self._stopped = True

    def on_stop(self, run: Run) -> None:
        """Say why the run stopped early (when this rule stopped it)."""
        if self._stopped and run.stop_reason == "early_stopped":
            r = self.rule
            run.logger.say(f"early stopping at step {run.step}: eval {r.metric} has not "
                           f"improved for {r.patience} evaluations (best {r.best:.6g} at "
                           f"step {r.best_step})")

    def state(self) -> dict[str, Any]:
        """The rule's best value and count."""
        return self.rule.state()

    def restore(self, state: dict[str, Any]) -> None:
        """Continue the rule."""
        self.rule.restore(state)


class WatchSignals(Hook):
    """Stops the run after a SIGTERM/SIGINT, after the same step on every process.

    Alone, a process stops after the step the signal came in; with peers, the processes
    agree at the next log point (one small all-gather) and at the end.
    """

    def __init__(self, log_every: int):
        self.log_every = log_every

    def after_step(self, run: Run, sums: dict[str, jax.Array]) -> None:
        """Stop after this step if a signal came (to any process, at a log point)."""
        if jax.process_count() == 1:
            if run.signal_requested() is not None:
                run.request_stop("preempted", run.signal_requested())
        elif run.step % self.log_every == 0:
            by = first_signal(run.signal_requested())
            if by is not None:
                run.request_stop("preempted", by)

    def on_stop(self, run: Run) -> None:
        """With peers, agree on a signal that came after the last log point."""
        if run.stop_reason is None and jax.process_count() > 1:
            by = first_signal(run.signal_requested())
            if by is not None:
                run.request_stop("preempted", by)


class SaveCheckpoints(Hook):
    """Checkpoints every `every` steps, at each new best evaluation, and at the end.

    A save is written in the background (`checkpoint.background`) while the next steps
    run; the next save, and the end of the run, wait for it first. A checkpoint is never
    written from non-finite parameters.
    """

    def __init__(self, store: CheckpointStore, writer: CheckpointWriter, every: int,
                 steps: int, meta: Callable[[Run, str], RunMeta],
                 lock: WorkdirLock | None, workdir: Path | None):
        self.store, self.writer, self.every, self.steps = store, writer, every, steps
        self.meta, self.lock, self.workdir = meta, lock, workdir
        self._saving: list[int] = []  # the step of the save in flight

    def after_step(self, run: Run, sums: dict[str, jax.Array]) -> None:
        """Save at a checkpoint point or a new best (the last step's save is the end's)."""
        if run.stop_reason is not None or run.step >= self.steps:
            return
        best = run.eval_values is not None and self.store.improves(run.eval_values)
        if best or (self.every and run.step % self.every == 0):
            self._save(run, "completed")

    def on_stop(self, run: Run) -> None:
        """The end-of-run checkpoint, waited for."""
        self._save(run, run.stop_reason or "completed")
        self._finish()

    def settle(self, run: Run) -> None:
        """Wait for the save in flight (its error is not the one to report)."""
        self.writer.wait(raise_error=False)

    def _save(self, run: Run, reason: str) -> None:
        run.sync()
        started = time.perf_counter()
        with host_reads():
            form = run.layout.checkpoint_form(run.backend, run.state)
            finite = _all_finite(form.params)
        if not finite:
            run.logger.say(f"step {run.step}: no checkpoint saved, the parameters are not "
                           f"finite")
            return
        self._finish()
        if self.lock is not None:
            self.lock.check()  # the workdir is still this run's alone
        with host_reads():
            self.writer.save(run.step, form, self.meta(run, reason).to_json(),
                             self._committed(run, run.step, time.perf_counter() - started),
                             logical=run.layout.logical, split=run.layout.split_leaves())
        self._saving.append(run.step)

    def _committed(self, run: Run, step: int, copied: float) -> Callable[[Path, float], None]:
        def done(path: Path, seconds: float) -> None:  # in the writer's thread, maybe
            run.checkpoint = path
            if is_primary():
                record_saved_step(self.workdir, step)
            where = " in the background" if self.writer.background else ""
            run.logger.say_later(f"saved {path.name}: {copied:.2f} s to copy it to the host, "
                                 f"then {seconds:.2f} s to write it{where}")
        return done

    def _finish(self) -> None:
        self.writer.wait()
        for step in self._saving:
            barrier(f"checkpoint-{step}")  # nobody reads or moves on before it is done
        self._saving.clear()


def default_hooks(config: Config, eval_step: Callable | None, eval_data: Any,
                  saves: SaveCheckpoints | None) -> list[Hook]:
    """The hooks of jaxdist's own actions, in the order they act after each step."""
    t = config.train
    e = t.early_stopping
    hooks: list[Hook] = [ShowProgress(), LogTraining(t.log_every, t.steps),
                         GuardNonfinite(t.max_nonfinite, t.skip_nonfinite)]
    if eval_step is not None:
        hooks.append(Evaluate(eval_step, eval_data, t.batch_size, t.eval_every))
    hooks.append(WatchSignals(t.log_every))
    if saves is not None:
        hooks.append(saves)
    hooks.append(StopEarly(EarlyStopping(e.patience, e.metric, e.mode, e.min_delta)))
    return hooks


def window_of(meta: RunMeta | None) -> MetricWindow:
    """The metric window a checkpoint's meta continues (a fresh one without)."""
    window = MetricWindow()
    if meta is not None:
        window.restore(meta.window)
    return window


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
