"""The training loop: data -> step -> metrics -> evaluation.

`fit` is an importable library function, so the same run works from a notebook, a test or
the CLI (`jaxdist.run`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import jax

from jaxdist.config import Config, to_json
from jaxdist.data import (
    DevicePrefetcher,
    Loader,
    as_source,
    class_balanced_probabilities,
    column,
    eval_batches,
)
from jaxdist.experiment import Experiment
from jaxdist.metrics import MetricsLogger, MetricWindow
from jaxdist.optimizers import build_optimizer
from jaxdist.parallel import Backend, InFlightLimit, make_backend
from jaxdist.step import TrainState, make_eval_step, make_train_step

PyTree = Any


@dataclass
class TrainResult:
    """What a finished run leaves: its state on the devices, its logged points."""

    state: TrainState  # replicated on the backend's devices
    backend: Backend
    records: list[dict[str, Any]]
    loader_state: dict[str, int]  # the loader's position after the last step

    @property
    def params(self) -> PyTree:
        """One copy of the final parameters, as numpy."""
        return self.backend.first_copy(self.state.params)

    def last(self, split: str) -> dict[str, Any]:
        """The last logged point of `split` (`train` or `eval`)."""
        return [r for r in self.records if r["split"] == split][-1]


def make_loader(data: Any, config: Config, local_devices: int) -> Loader:
    """The training loader for this process, as `config.train` and `config.loader` say."""
    source = as_source(data, "training data")
    probabilities = None
    if config.loader.sampling == "balanced":
        probabilities = class_balanced_probabilities(column(source, config.loader.label_key))
    return Loader(source, config.train.batch_size, local_devices, seed=config.train.seed,
                  process_index=jax.process_index(), process_count=jax.process_count(),
                  shuffle=config.loader.shuffle, drop_remainder=config.loader.drop_remainder,
                  probabilities=probabilities)


def fit(experiment: Experiment, config: Config, workdir: Path | None = None,
        stream: TextIO | None = sys.stdout) -> TrainResult:
    """Train `experiment` as `config` says; log to `workdir` (if given) and `stream`."""
    backend = make_backend(config.parallel.backend, config.parallel.devices)
    loader = make_loader(experiment.train_data, config, backend.num_devices)
    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(to_json(config) + "\n")
    logger = MetricsLogger(workdir, stream, total_steps=config.train.steps)

    tx = build_optimizer(config.optimizer)
    init_key, train_key = jax.random.split(jax.random.key(config.train.seed))
    params = experiment.init_params(init_key)
    state = backend.replicate(TrainState.create(params, tx, train_key))
    train_step = backend.compile(
        make_train_step(experiment.loss_fn, tx, config.parallel.grad_reduce))

    window, in_flight = MetricWindow(), InFlightLimit()
    with DevicePrefetcher(loader, backend.put_batch, config.loader.prefetch) as batches:
        for step in range(1, config.train.steps + 1):
            state, sums = train_step(state, next(batches))
            window.add(sums)
            in_flight.add(sums)
            if step % config.train.log_every == 0 or step == config.train.steps:
                logger.log(step, "train", window.summarize(backend))
        loader_state = batches.state()

    if experiment.eval_data is not None:
        eval_step = backend.compile(make_eval_step(experiment.evaluation_fn()),
                                    donate_state=False)
        values = evaluate(backend, eval_step, state.params, experiment.eval_data,
                          config.train.batch_size)
        logger.log(config.train.steps, "eval", values)
    return TrainResult(state=state, backend=backend, records=logger.records,
                       loader_state=loader_state)


def evaluate(backend: Backend, eval_step: Any, params: PyTree, data: Any,
             batch_size: int) -> dict[str, float]:
    """Exact weighted means of the loss and aux metrics over one pass of `data`."""
    window, in_flight = MetricWindow(), InFlightLimit()
    batches = eval_batches(data, batch_size, backend.num_devices,
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
    with DevicePrefetcher(batches, backend.put_batch) as device_batches:
        for batch in device_batches:
            sums = eval_step(params, batch)
            window.add(sums)
            in_flight.add(sums)
    values = window.summarize(backend)
    values.pop("steps_per_sec")
    return values
