"""Timing a train step, its compute alone and its all-reduce alone, at several device counts.

Every program is compiled first (its compile time kept), then all of them run in rounds: each
round runs every program for the same number of steps, in a shuffled order, so that a noisy
machine's drift spreads over all of them alike. A program's figure is the median over the
rounds of its seconds per step, with the quartiles beside it.

The programs, for each device count n:
- `step`: the experiment's train step as `fit` runs it, on one batch already on the devices
  (the input pipeline is not timed);
- `compute`: the same step with every cross-device `psum` replaced by the device's own value
  (the `ComputeOnly` strategy), compiled by the pmap backend without its replication check;
- `allreduce`: a `psum` over n devices of a tree shaped and typed like the gradient (the
  params): the communication part of a step. It includes launching a program, much as a
  step's all-reduce includes waiting for the slowest device (with an empty program's time
  taken off, it would count much less than the step spends on its reductions).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from jaxdist.base.config import Config, apply_overrides
from jaxdist.loop.start import prepare_run, step_options
from jaxdist.parallel.backend import AXIS
from jaxdist.parallel.dispatch import InFlightLimit
from jaxdist.parallel.pmap import PmapBackend
from jaxdist.parallel.strategies import Strategy
from jaxdist.step.experiment import Experiment
from jaxdist.step.optimizers import build_optimizer
from jaxdist.step.steps import make_train_step

PARTS = ("step", "compute", "allreduce")


@dataclass(frozen=True)
class Setting:
    """One program to time: its part, its device count and its per-device batch."""

    part: str  # one of PARTS
    devices: int
    per_device_batch: int = 0  # 0 for the all-reduce programs, which take no batch


@dataclass
class Timing:
    """What was measured of one program."""

    setting: Setting
    seconds: list[float] = field(default_factory=list)  # per step, one figure per round
    compile_seconds: float = 0.0

    @property
    def median(self) -> float:
        """Median seconds per step over the rounds."""
        return statistics.median(self.seconds)

    @property
    def quartiles(self) -> tuple[float, float]:
        """First and third quartiles of the seconds per step (their gap is the IQR)."""
        if len(self.seconds) < 2:
            return self.median, self.median
        q1, _, q3 = statistics.quantiles(self.seconds, n=4, method="inclusive")
        return q1, q3

    def to_json(self) -> dict[str, Any]:
        """A JSON-able summary (all times in seconds)."""
        q1, q3 = self.quartiles
        return {"part": self.setting.part, "devices": self.setting.devices,
                "per_device_batch": self.setting.per_device_batch, "median": self.median,
                "q1": q1, "q3": q3, "rounds": self.seconds,
                "compile_seconds": self.compile_seconds}


Runner = Callable[[int], float]  # runs k steps, returns seconds per step


@dataclass
class Program:
    """A compiled program ready to time."""

    run: Runner
    compile_seconds: float
    compiled: Any  # jax.stages.Compiled: `.as_text()` is the optimized program


class ComputeOnly(Strategy):
    """The replicated step without its communication, for measurement only.

    Every cross-device sum is the device's own value, so the step computes what it does
    on one device's rows alone. Its outputs differ across devices, which `Backend.compile`
    refuses: it is compiled by the pmap backend with `traced=True` (no replication check),
    and never trains.
    """

    def total(self, tree: Any) -> Any:
        """The device's own `tree`, not summed."""
        return tree


def gradient_tree(params: Any) -> Any:
    """Zeros shaped and typed like `params`: what a step's gradient all-reduce carries."""
    return jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), params)


def tree_bytes(tree: Any) -> int:
    """The bytes of all leaves of `tree`."""
    return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(tree))


def _compiled(fn: Callable, *args: Any) -> tuple[Any, float]:
    """`fn` lowered for `args` and compiled, and the seconds the compilation took."""
    began = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - began


def _step_program(fn: Callable, state: Any, batch: Any) -> Program:
    compiled, seconds = _compiled(fn, state, batch)

    def run(steps: int) -> float:
        nonlocal state
        in_flight = InFlightLimit()
        began = time.perf_counter()
        for _ in range(steps):
            state, sums = compiled(state, batch)
            in_flight.add(sums)
        jax.block_until_ready(state)
        return (time.perf_counter() - began) / steps

    return Program(run, seconds, compiled)


def step_programs(experiment: Experiment, config: Config, devices: int, global_batch: int
                  ) -> tuple[dict[str, Program], Any]:
    """The `step` and `compute` programs on `devices`, and one host copy of the params.

    `global_batch` 0 is the whole training set each step (`train.batch_size=full`).
    """
    config = apply_overrides(config, [f"parallel.devices={devices}",
                                      f"train.batch_size={global_batch}"])
    start = prepare_run(experiment, config, None, False, ())
    backend, c, layout = start.backend, start.config, start.layout
    host_batch = start.loader.peek()
    full = _step_program(start.train_step, layout.to_devices(backend, start.host_state),
                         backend.put_batch(host_batch))
    # Outputs that differ across devices: the pmap backend without its replication check.
    # The compute is that of the unsplit step (parallel.shard only moves its collectives).
    tx = build_optimizer(c.optimizer, devices=len(backend.global_devices))
    local = make_train_step(experiment.loss_fn, tx, ComputeOnly(),
                            step_options(experiment, c), has_state=experiment.has_state)
    pmap_backend = PmapBackend(backend.devices)
    mapped = pmap_backend.compile(local, traced=True)
    compute = _step_program(mapped, pmap_backend.replicate(start.host_state),
                            pmap_backend.put_batch(host_batch))
    return {"step": full, "compute": compute}, start.host_state.params


def allreduce_program(params: Any, devices: Sequence[jax.Device]) -> tuple[Program, int]:
    """A `psum` over `devices` of a gradient shaped like `params`, and the bytes it carries."""
    grads = gradient_tree(params)
    placed = PmapBackend(devices).replicate(grads)
    reduce = jax.pmap(lambda g: jax.lax.psum(g, AXIS), axis_name=AXIS, devices=devices)
    compiled, seconds = _compiled(reduce, placed)

    def run(steps: int) -> float:
        in_flight = InFlightLimit()
        began = time.perf_counter()
        for _ in range(steps):
            out = compiled(placed)
            in_flight.add(out)
        jax.block_until_ready(out)
        return (time.perf_counter() - began) / steps

    return Program(run, seconds, compiled), tree_bytes(grads)


def run_in_rounds(runners: dict[Setting, Runner], rounds: int, steps: int, seed: int = 0,
                  progress: Callable[[int], None] | None = None) -> dict[Setting, list[float]]:
    """Seconds per step of every runner, `rounds` times, each round in a shuffled order.

    Each runner first runs a few warm-up steps, untimed.
    """
    for run in runners.values():
        run(max(2, steps // 4))
    seconds: dict[Setting, list[float]] = {setting: [] for setting in runners}
    order = list(runners)
    shuffler = random.Random(seed)
    for index in range(rounds):
        shuffler.shuffle(order)
        for setting in order:
            seconds[setting].append(runners[setting](steps))
        if progress is not None:
            progress(index + 1)
    return seconds
