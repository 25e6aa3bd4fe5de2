"""A scaling study: what to measure, measuring it, and the cost model fitted to it.

Weak scaling keeps each device's batch fixed (the global batch grows with the devices);
strong scaling keeps the global batch fixed (each device's share shrinks). Both are timed
at every device count of the plan, with the compute part and the all-reduce part of a step
beside the whole step (see `jaxdist.scaling.measure`); the model of `jaxdist.scaling.costmodel` is
fitted to the counts of `Plan.fit_counts` and checked against the others.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np

from jaxdist.base.config import Config
from jaxdist.base.errors import UserError, at_least
from jaxdist.data import as_source
from jaxdist.loop.compiled import ring_traffic
from jaxdist.scaling.costmodel import ComputeModel, StepModel, fit_compute, fit_ring
from jaxdist.scaling.measure import (
    Program,
    Setting,
    Timing,
    allreduce_program,
    run_in_rounds,
    step_programs,
)
from jaxdist.step.experiment import Experiment

MODES = ("weak", "strong")


@dataclass(frozen=True)
class Plan:
    """What a study measures: device counts, batches, and how long to time each program."""

    counts: tuple[int, ...]  # device counts measured, ascending
    fit_counts: tuple[int, ...]  # those the model is fitted to
    per_device_batch: int  # weak scaling
    global_batch: int  # strong scaling
    rounds: int
    window_steps: int  # steps per program per round

    def batch(self, mode: str, devices: int) -> int:
        """The per-device batch of `mode` at `devices`."""
        return self.per_device_batch if mode == "weak" else self.global_batch // devices


def make_plan(config: Config, dataset_size: int, counts: Sequence[int],
              fit_counts: Sequence[int] | None, per_device_batch: int | None,
              global_batch: int | None, rounds: int, window_steps: int,
              available: int, platform: str) -> Plan:
    """Check the choices against the devices and the data; one line naming the fix if not.

    Defaults: the strong-scaling global batch is the experiment's `train.batch_size` (for
    `full`, the largest batch up to the data set that every count divides); the weak-scaling
    per-device batch is that over the largest count; the model is fitted to every count but
    the largest (which then checks it) when that leaves two counts of 2 devices or more.
    """
    counts = tuple(sorted(set(counts)))
    if not counts or counts[0] < 1:
        raise UserError("--devices must list device counts >= 1, e.g. --devices 1,2,4,8")
    if counts[-1] > available:
        raise UserError(f"--devices {counts[-1]} but only {available} {platform} device(s) are "
                        f"available; use counts <= {available}"
                        + (" or more CPU devices (--cpu-devices N)" if platform == "cpu"
                           else ""))
    if len(counts) < 2 or counts[-1] < 2:
        raise UserError("--devices needs two counts or more, one of them >= 2, to fit the "
                        "all-reduce; e.g. --devices 1,2,4,8")
    if fit_counts is None:
        # Hold the largest count out to check the model, if two counts >= 2 are left to fit
        # the all-reduce's bandwidth and latency apart.
        fit_counts = counts[:-1] if sum(n >= 2 for n in counts[:-1]) >= 2 else counts
    fit_counts = tuple(sorted(set(fit_counts)))
    if not set(fit_counts) <= set(counts):
        raise UserError(f"--fit-devices {','.join(map(str, fit_counts))} must be among --devices "
                        f"{','.join(map(str, counts))}")
    if len(fit_counts) < 2 or fit_counts[-1] < 2:
        raise UserError("--fit-devices needs two counts or more, one of them >= 2")
    if rounds < 1 or window_steps < 1:
        raise UserError(f"--rounds {rounds} and --window-steps {window_steps} must be >= 1")
    every = math.lcm(*counts)
    if global_batch is None:
        global_batch = config.train.batch_size or dataset_size // every * every
    if global_batch < 1 or global_batch % every:
        raise UserError(f"the strong-scaling global batch {global_batch} cannot be split over "
                        f"{', '.join(map(str, counts))} devices alike; use --global-batch (or "
                        f"train.batch_size) a multiple of {every}, e.g. {max(every, 1)}")
    if per_device_batch is None:
        per_device_batch = global_batch // counts[-1]
    if per_device_batch < 1:
        raise UserError(at_least(f"--per-device-batch {per_device_batch}", 1))
    for label, size in (("--global-batch", global_batch),
                        ("--per-device-batch x devices", per_device_batch * counts[-1])):
        if size > dataset_size and config.loader.drop_remainder:
            raise UserError(f"{label} = {size} is more than the {dataset_size} training "
                            f"examples; use a smaller batch (--per-device-batch, "
                            f"--global-batch) or fewer devices")
    return Plan(counts, fit_counts, per_device_batch, global_batch, rounds, window_steps)


@dataclass
class Measured:
    """Everything a study measured."""

    timings: dict[Setting, Timing]
    gradient_bytes: int
    parameter_count: int
    dataset_size: int
    platform: str
    device_kind: str
    cpu_count: int
    # The step's ring traffic / that of one all-reduce of the gradient (read from the
    # compiled step at the largest count): 1 for an all-reduce, or for parallel.shard's
    # reduce-scatter + all-gather; more when the backward pass gathers the params again.
    volume: float = 1.0

    def timing(self, part: str, devices: int, per_device_batch: int = 0) -> Timing:
        """The timing of one program."""
        return self.timings[Setting(part, devices, per_device_batch)]

    def step(self, plan: Plan, mode: str, devices: int, part: str = "step") -> Timing:
        """The timing of `part` ("step" or "compute") of `mode` at `devices`."""
        return self.timing(part, devices, plan.batch(mode, devices))


def dataset_size(experiment: Experiment) -> int:
    """How many training examples the experiment has."""
    return len(as_source(experiment.train_data, "the training data"))


def measure(experiment: Experiment, config: Config, plan: Plan,
            log: Callable[[str], None] = print) -> Measured:
    """Compile every program of the plan, then time them all in interleaved rounds."""
    programs: dict[Setting, Program] = {}
    params, gradient_bytes = None, 0
    for n in plan.counts:
        log(f"compiling for {n} device(s)")
        for mode in MODES:
            b = plan.batch(mode, n)
            if Setting("step", n, b) in programs:  # weak and strong meet at one count
                continue
            built, params = step_programs(experiment, config, n, b * n)
            programs.update({Setting(part, n, b): program for part, program in built.items()})
        programs[Setting("allreduce", n)], gradient_bytes = allreduce_program(
            params, jax.local_devices()[:n])
    volume = 1.0
    largest = plan.counts[-1]
    if largest > 1:
        program = programs[Setting("step", largest, plan.batch("weak", largest))]
        allreduce = 2 * (largest - 1) / largest * gradient_bytes
        volume = ring_traffic(program.compiled.as_text(), largest) / allreduce
    log(f"timing {len(programs)} programs: {plan.rounds} rounds x {plan.window_steps} steps")

    def progress(done: int) -> None:
        if done % max(1, plan.rounds // 4) == 0 or done == plan.rounds:
            log(f"round {done}/{plan.rounds}")

    seconds = run_in_rounds({s: p.run for s, p in programs.items()}, plan.rounds,
                            plan.window_steps, progress=progress)
    timings = {s: Timing(s, seconds[s], p.compile_seconds) for s, p in programs.items()}
    device = jax.devices()[0]
    return Measured(timings, gradient_bytes,
                    sum(int(np.size(x)) for x in jax.tree.leaves(params)),
                    dataset_size(experiment), device.platform, device.device_kind,
                    os.cpu_count() or 1, volume)


def fit(measured: Measured, plan: Plan) -> StepModel:
    """The cost model fitted to the plan's fit counts.

    Compute: every `compute` timing (weak and strong) at those counts; on a CPU the cores
    are fitted between 1 and the host's core count. All-reduce: the benchmark at those
    counts (2 devices or more).
    """
    points = {(plan.batch(mode, n), n, measured.step(plan, mode, n, "compute").median)
              for mode in MODES for n in plan.fit_counts}
    compute = fit_compute(sorted(points),
                          measured.cpu_count if measured.platform == "cpu" else None)
    link = fit_ring([(measured.gradient_bytes, n, measured.timing("allreduce", n).median)
                     for n in plan.fit_counts])
    return StepModel(compute, link, measured.gradient_bytes, volume=measured.volume)


def accelerator_model(fitted: StepModel) -> ComputeModel:
    """The fitted compute with devices that no longer share anything (a named interconnect)."""
    return ComputeModel(fitted.compute.overhead, fitted.compute.per_example, None)


def check(model: StepModel, measured: Measured, plan: Plan) -> list[dict]:
    """Measured and predicted step time at every measured count and mode, with the error."""
    rows = []
    for mode in MODES:
        for n in plan.counts:
            timing = measured.step(plan, mode, n)
            predicted = model.step_seconds(plan.batch(mode, n), n)
            rows.append({"mode": mode, "devices": n, "fitted": n in plan.fit_counts,
                         "measured_s": timing.median, "predicted_s": predicted,
                         "error": predicted / timing.median - 1})
    return rows
