"""The loop's one interface to what it does besides stepping: hooks, and the run they see.

The loop (`jaxdist.loop.fit`) only steps; everything else (logging, evaluation, the
non-finite guard, signals, checkpoints, early stopping, the progress line, and a user's own
hooks) is a `Hook` called at five moments: on start, after each step, after metrics came
to the host, after a train point or an evaluation was logged, and on stop. A hook with a
`key` keeps its state in every checkpoint (`state()`) and gets it back on resume
(`restore()`), so a resumed run acts as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax

from jaxdist.base.config import Config
from jaxdist.base.errors import UserError
from jaxdist.base.pytree import PyTree
from jaxdist.loop.metrics import MetricsLogger, MetricWindow
from jaxdist.parallel.backend import Backend
from jaxdist.parallel.layout import StateLayout
from jaxdist.step.steps import TrainState


class Hook:
    """Something the loop does at its moments; override the moments you need.

    Every process calls every hook at the same moments (a hook may use collectives there);
    `jaxdist.parallel.processes.is_primary()` tells the process that writes. A hook that
    sets `key` (a name for its part of a checkpoint's meta.json) has its `state()` saved
    with each checkpoint and handed to `restore()` on resume; the state must be JSON-able.
    """

    key: str | None = None

    def on_start(self, run: Run) -> None:
        """Before the first step of this process (also after a resume)."""

    def after_step(self, run: Run, sums: dict[str, jax.Array]) -> None:
        """After step `run.step`; `sums` are its summed metrics, still on the devices."""

    def after_sync(self, run: Run, rows: list[dict[str, float]]) -> None:
        """After the summed metrics of the steps since the last sync came to the host."""

    def after_log(self, run: Run, split: str, values: dict[str, float]) -> None:
        """After a point of `split` ("train" or "eval") was logged at `run.step`."""

    def on_stop(self, run: Run) -> None:
        """After the last step (`run.stop_reason` says why the loop ended, None: all done)."""

    def settle(self, run: Run) -> None:
        """Finish what is in flight without raising (the run is failing, or reports)."""

    def state(self) -> Any:
        """What a checkpoint keeps of this hook (with a `key`)."""
        return None

    def restore(self, state: Any) -> None:
        """Continue from `state()` of a checkpoint."""


@dataclass
class Run:
    """What the hooks see of a run in progress, and the few things they may ask of it."""

    config: Config
    backend: Backend
    layout: StateLayout
    logger: MetricsLogger
    window: MetricWindow
    hooks: Sequence[Hook]
    state: TrainState
    step: int
    stop_reason: str | None = None  # set by `request_stop`; None: the run goes on
    stopped_by: str | None = None  # the signal that stopped it ("SIGTERM to process 1")
    eval_values: dict[str, float] | None = None  # this step's evaluation, if it had one
    checkpoint: Any = None  # the newest checkpoint written or restored (a Path)
    ending: bool = False  # past the last step: the final evaluation and save
    signal_requested: Callable[[], str | None] = lambda: None  # this process's signal
    loader_state: Callable[[], dict[str, int]] = dict  # the loader's position now

    def fire(self, moment: str, *args: Any) -> None:
        """Call `moment` (e.g. "after_step") of every hook, in order."""
        for hook in self.hooks:
            getattr(hook, moment)(self, *args)

    def request_stop(self, reason: str, by: str | None = None) -> None:
        """End the loop after this step, and save.

        `reason`: "early_stopped" (the run is done: a rerun does not continue it) or
        "preempted" (by the signal `by`: a rerun continues it).
        """
        self.stop_reason, self.stopped_by = reason, by

    def sync(self, also: PyTree = None) -> Any:
        """Bring the pending steps' metrics to the host (one transfer) and tell the hooks.

        `also` (small replicated values) comes back in the same transfer, as numpy.
        """
        rows, also = self.window.sync(self.backend, also)
        if rows:
            self.fire("after_sync", rows)
        return also

    def log(self, split: str, values: dict[str, float]) -> None:
        """Log a point of `split` at this step and tell the hooks."""
        self.logger.log(self.step, split, values)
        self.fire("after_log", split, values)

    def settle(self) -> None:
        """Let every hook finish what is in flight (without raising)."""
        self.fire("settle")


# The meta.json keys that jaxdist writes itself, its own hooks' included; a hook's `key`
# must be another one.
RESERVED_KEYS = ("format", "step", "signature", "split", "loader", "identity", "devices",
                 "window", "config", "stop_reason", "eval", "nonfinite", "early_stopping")


def check_keys(hooks: Sequence[Hook]) -> None:
    """Refuse (one line) hooks whose checkpoint keys clash with jaxdist's or each other's."""
    seen: set[str] = set()
    for hook in hooks:
        if hook.key is None:
            continue
        if hook.key in RESERVED_KEYS or hook.key in seen:
            owner = "jaxdist" if hook.key in RESERVED_KEYS else "another hook"
            raise UserError(f"hook {type(hook).__name__} keeps its state under key "
                            f"{hook.key!r}, which {owner} uses already; give it another "
                            f"`key`")
        seen.add(hook.key)
