"""The training loop: data -> step -> metrics -> evaluation.

`fit` is an importable library function, so the same run works from a notebook, a test or
the CLI (`jaxdist.run`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

from jaxdist.config import Config, to_json
from jaxdist.data import ArrayBatches, eval_batches, prefetch_to_devices
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

    @property
    def params(self) -> PyTree:
        """One copy of the final parameters, as numpy."""
        return self.backend.first_copy(self.state.params)

    def last(self, split: str) -> dict[str, Any]:
        """The last logged point of `split` (`train` or `eval`)."""
        return [r for r in self.records if r["split"] == split][-1]


def fit(experiment: Experiment, config: Config, workdir: Path | None = None,
        stream: TextIO | None = sys.stdout) -> TrainResult:
    """Train `experiment` as `config` says; log to `workdir` (if given) and `stream`."""
    backend = make_backend(config.parallel.backend, config.parallel.devices)
    batches = ArrayBatches(experiment.train_data, config.train.batch_size,
                           backend.num_devices, seed=config.train.seed)
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
    device_batches = prefetch_to_devices(batches, backend.put_batch)
    for step in range(1, config.train.steps + 1):
        state, sums = train_step(state, next(device_batches))
        window.add(sums)
        in_flight.add(sums)
        if step % config.train.log_every == 0 or step == config.train.steps:
            logger.log(step, "train", window.summarize(backend))

    if experiment.eval_data is not None:
        eval_step = backend.compile(make_eval_step(experiment.evaluation_fn()),
                                    donate_state=False)
        values = evaluate(backend, eval_step, state.params, experiment.eval_data,
                          config.train.batch_size)
        logger.log(config.train.steps, "eval", values)
    return TrainResult(state=state, backend=backend, records=logger.records)


def evaluate(backend: Backend, eval_step: Any, params: PyTree,
             data: Mapping[str, np.ndarray], batch_size: int) -> dict[str, float]:
    """Exact weighted means of the loss and aux metrics over one pass of `data`."""
    window, in_flight = MetricWindow(), InFlightLimit()
    batches = eval_batches(data, batch_size, backend.num_devices)
    for batch in prefetch_to_devices(batches, backend.put_batch):
        sums = eval_step(params, batch)
        window.add(sums)
        in_flight.add(sums)
    values = window.summarize(backend)
    values.pop("steps_per_sec")
    return values
