"""Shared by the benchmarks: paired rounds in shuffled order, medians and ratios."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any


def compare_in_rounds(sides: dict[str, Callable[[int], float]], baseline: str, rounds: int,
                      steps: int, unit: str = "steps/s") -> None:
    """Run every side for `steps` steps per round, in a shuffled order, and print a table.

    Each side returns its rate (per second) for the steps it ran. The ratio of each rate to
    the `baseline`'s is taken within each round, so drift of a noisy machine cancels; the
    table shows its median and IQR, and the time ratio (its inverse: time per step
    relative to the baseline).
    """
    for run in sides.values():  # compile and warm up
        run(max(steps // 4, 2))
    rates: dict[str, list[float]] = {name: [] for name in sides}
    ratios: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    shuffler = random.Random(0)
    for _ in range(rounds):
        shuffler.shuffle(order)  # no side always runs first, or right after the same one
        this_round = {name: sides[name](steps) for name in order}
        for name, rate in this_round.items():
            rates[name].append(rate)
            ratios[name].append(rate / this_round[baseline])
    print(f"rate ratio and time ratio to '{baseline}': medians over {rounds} rounds")
    print(f"{'side':30s} {'median ' + unit:>20s} {'min':>10s} {'max':>10s} "
          f"{'rate ratio (IQR)':>24s} {'time ratio':>11s}")
    for name, values in rates.items():
        q1, median, q3 = statistics.quantiles(ratios[name], n=4)
        median = statistics.median(ratios[name])
        print(f"{name:30s} {statistics.median(values):20.1f} {min(values):10.1f} "
              f"{max(values):10.1f} {median:9.3f} ({q1:.3f}-{q3:.3f}) {1 / median:11.3f}")


def mlp_params(sizes: list[int], seed: int = 0) -> list[dict[str, Any]]:
    """ReLU-MLP weights for layer widths `sizes` (input first, logits last)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
    return [{"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)]


def mlp_logits(params: list[dict[str, Any]], x: Any) -> Any:
    """The MLP of `mlp_params` applied to `x` `[batch, sizes[0]]`."""
    import jax

    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def jaxdist_runner(step: Callable, state: Any, batch: Any, backend: Any
                   ) -> Callable[[int], float]:
    """A side that runs a compiled jaxdist step as `fit` does, returning steps/s.

    Metric sums stay on the devices and are read once at the end (one window), and at most
    2 steps run ahead of the host (`jaxdist.parallel.dispatch.InFlightLimit`).
    """
    from jaxdist.loop.metrics import MetricWindow
    from jaxdist.parallel.dispatch import InFlightLimit

    def run(steps: int) -> float:
        nonlocal state
        window, in_flight = MetricWindow(), InFlightLimit()
        began = time.perf_counter()
        for _ in range(steps):
            state, sums = step(state, batch)
            window.add(sums)
            in_flight.add(sums)
        window.summarize(backend)
        return steps / (time.perf_counter() - began)

    return run
