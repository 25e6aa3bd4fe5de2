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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

from jaxdist.base.config import Config, flatten, to_dict, to_json
from jaxdist.base.errors import UserError
from jaxdist.base.files import write_text_atomically
from jaxdist.base.pytree import PyTree
from jaxdist.checkpoints.integrity import MANIFEST, sha256_file
from jaxdist.checkpoints.meta import RunMeta
from jaxdist.checkpoints.saving import CheckpointWriter
from jaxdist.checkpoints.workdir import require_same_resume, require_same_workdir
from jaxdist.data import DevicePrefetcher
from jaxdist.loop.actions import SaveCheckpoints, default_hooks, window_of
from jaxdist.loop.discovery import file_digest
from jaxdist.loop.hooks import Hook, Run, check_keys
from jaxdist.loop.metrics import MetricsLogger
from jaxdist.loop.preemption import PreemptionWatch
from jaxdist.loop.profiling import profile_hooks
from jaxdist.loop.start import Start, prepare_run
from jaxdist.loop.trackers import tracker_hooks
from jaxdist.parallel.agreement import agree, require_same_config
from jaxdist.parallel.backend import Backend
from jaxdist.parallel.dispatch import InFlightLimit, host_reads
from jaxdist.parallel.layout import StateLayout
from jaxdist.parallel.processes import barrier, is_primary
from jaxdist.step.experiment import Experiment
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
        allow_changes: Sequence[str] = (), hooks: Sequence[Hook] = ()) -> TrainResult:
    """Train `experiment` as `config` says; log and checkpoint in `workdir` (if given).

    `start_over` first removes everything an earlier run wrote in `workdir`.
    `allow_changes` names config keys (e.g. `optimizer.learning_rate`) that may differ from
    the checkpoint's on resume; every other difference is refused. `hooks`
    (`jaxdist.loop.hooks.Hook`) act after jaxdist's own at each moment of the loop.
    """
    if isinstance(workdir, str) and not workdir.strip():
        raise UserError(f"the workdir {workdir!r} is empty; give a folder (a new one for a new "
                        f"run)")
    check_keys(hooks)
    with host_reads():  # start-up reads and writes device values freely
        start = agree("start", lambda: prepare_run(experiment, config, workdir, start_over,
                                                   allow_changes),
                      undo=lambda started: started.lock and started.lock.release())
    try:
        require_same_workdir(start.workdir, start.lock and start.lock.token)
        require_same_resume(_resume_name(start))
        require_same_config({**flatten(to_dict(start.config)),
                             "experiment": start.identity})
        return _train(experiment, start, hooks, stream)
    finally:
        if start.store is not None:
            start.store.close()
        if start.lock is not None:
            start.lock.release()


def _resume_name(start: Start) -> str:
    """What this process resumes: a checkpoint and its manifest's sha256, or nothing."""
    if start.resumed is None:
        return "nothing"
    path = start.store.path(start.step)
    return f"{path.name} (manifest sha256 {sha256_file(path / MANIFEST)[:16]})"


def _train(experiment: Experiment, start: Start, hooks: Sequence[Hook],
           stream: TextIO | None) -> TrainResult:
    """Run the loop from `start` to the end, an early stop, or a signal."""
    config, backend, layout, meta = start.config, start.backend, start.layout, start.resumed_meta
    logger = _open_logger(experiment, start, stream)
    state = layout.to_devices(backend, start.host_state)
    if _finished(start, logger, experiment.eval_data is not None):
        logger.close()
        return TrainResult(state, backend, config, logger.records, start.loader.state(),
                           start.step, "already_complete", checkpoint=start.checkpoint,
                           layout=layout)
    # Both steps were compiled, and checked, before the first step (`prepare_run`).
    train_step, eval_step = start.train_step, start.eval_step
    saves = None
    if start.store is not None:
        saves = SaveCheckpoints(start.store, CheckpointWriter(
            start.store, config.checkpoint.background), config.train.checkpoint_every,
            config.train.steps, _meta_of(start), start.lock, start.workdir)
    hooks = [*default_hooks(config, eval_step, experiment.eval_data, saves),
             *tracker_hooks(config, experiment.name, is_primary()),
             *profile_hooks(config, start.workdir, jax.process_index()), *hooks]
    for hook in hooks:
        if hook.key is not None and meta is not None and hook.key in meta.hooks:
            hook.restore(meta.hooks[hook.key])
    run = Run(config, backend, layout, logger, window_of(meta), hooks, state, start.step,
              checkpoint=start.checkpoint)
    try:
        _loop(run, train_step, start.loader, config.loader.prefetch)
    except BaseException:
        run.settle()  # a save in flight is finished, whatever stopped the run
        logger.close(raise_error=False)
        raise
    finally:
        logger.close()
    return TrainResult(run.state, backend, config, logger.records, run.loader_state(),
                       run.step, run.stop_reason or "completed", signal_name=run.stopped_by,
                       checkpoint=run.checkpoint, layout=layout)


def _loop(run: Run, train_step: Callable, loader: Any, prefetch: int) -> None:
    """Step until the last step or a stop; the hooks do everything else."""
    steps, in_flight = run.config.train.steps, InFlightLimit()
    with PreemptionWatch() as watch:
        run.signal_requested = lambda: watch.signal_name
        run.fire("on_start")
        with DevicePrefetcher(loader, run.backend.put_batch, prefetch) as batches:
            run.loader_state = batches.state
            while run.step < steps and run.stop_reason is None:
                run.state, sums = train_step(run.state, next(batches))
                run.step += 1
                in_flight.add(sums)
                run.fire("after_step", sums)
            position = batches.state()
        run.loader_state = lambda: position
        # The final evaluation and save are part of the run: a signal during them stops
        # the evaluation, saves without it, and the rerun finishes the run.
        run.ending = True
        run.fire("on_stop")


def _open_logger(experiment: Experiment, start: Start, stream: TextIO | None) -> MetricsLogger:
    """The run's logger, its metrics.jsonl cut at the resumed step; config.json written."""
    workdir, primary = start.workdir, is_primary()
    logger = MetricsLogger(workdir if primary else None, stream if primary else None,
                           total_steps=start.config.train.steps)
    logger.resume_at(start.step)
    if start.removed:
        logger.say(f"--restart removed {', '.join(start.removed)} from {workdir}")
    if start.resumed is not None:
        logger.say(f"resumed from {start.checkpoint}")
    if workdir is not None:
        barrier("resume-read")  # every process has read config.json before it is replaced
        if primary:
            source = experiment.source or experiment.name
            write_text_atomically(workdir / "config.json", to_json(
                start.config, source, _digest_or_none(source)) + "\n")
    return logger


def _finished(start: Start, logger: MetricsLogger, has_eval: bool) -> bool:
    """Whether the checkpoint resumed from ends the run (its lost eval line logged again)."""
    meta = start.resumed_meta
    if meta is None or not (meta.stop_reason == "early_stopped" or (
            start.step >= start.config.train.steps and meta.stop_reason == "completed"
            and (meta.eval is not None or not has_eval))):
        return False
    if meta.eval is not None and not any(
            r["step"] == start.step and r["split"] == "eval" for r in logger.records):
        logger.log(start.step, "eval", meta.eval)  # its line was lost with a crash
    return True


def _meta_of(start: Start) -> Callable[[Run, str], RunMeta]:
    """What a checkpoint of this run keeps besides the TrainState."""
    def meta(run: Run, stop_reason: str) -> RunMeta:
        return RunMeta(loader=run.loader_state(), identity=start.identity,
                       devices=len(run.backend.global_devices), window=run.window.state(),
                       config=to_dict(run.config), stop_reason=stop_reason,
                       eval=run.eval_values,
                       hooks={hook.key: hook.state() for hook in run.hooks
                              if hook.key is not None})
    return meta


def _digest_or_none(source: str) -> str | None:
    """The sha256 of the experiment file `source` (None: a bundled name, or unreadable)."""
    try:
        return file_digest(source)
    except OSError:
        return None
