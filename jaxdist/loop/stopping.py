"""When to stop: early stopping on an eval metric, and too many non-finite steps in a row."""

from __future__ import annotations

import math
from typing import Any

from jaxdist.base.errors import UserError, choose_one_of


class EarlyStopping:
    """Counts evaluations without improvement of one metric; `patience` of them stop a run.

    `patience=0` never stops. The state is JSON-able (`state()`/`restore()`), so a resumed
    run stops where an uninterrupted one would.
    """

    def __init__(self, patience: int, metric: str = "loss", mode: str = "min",
                 min_delta: float = 0.0):
        self.patience, self.metric, self.mode, self.min_delta = patience, metric, mode, min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evaluations = 0

    def update(self, step: int, values: dict[str, float]) -> bool:
        """Record one evaluation; return True when the run should stop now."""
        if self.patience == 0:
            return False
        if self.metric not in values:
            raise UserError(choose_one_of(f"train.early_stopping.metric={self.metric}",
                                          sorted(values), "is not an eval metric"))
        value = values[self.metric]
        if self._improves(value):
            self.best, self.best_step, self.bad_evaluations = value, step, 0
        else:
            self.bad_evaluations += 1
        return self.bad_evaluations >= self.patience

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of this rule."""
        return {"best": self.best, "best_step": self.best_step,
                "bad_evaluations": self.bad_evaluations}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()`."""
        self.best, self.best_step = state["best"], state["best_step"]
        self.bad_evaluations = state["bad_evaluations"]


class NonfiniteGuard:
    """Follows the per-step non-finite flags; `limit` in a row end the run (0: never)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.run = 0  # consecutive non-finite steps up to the last flag seen

    def update(self, nonfinite: bool) -> bool:
        """Record one step's flag; return True once `limit` have come in a row."""
        self.run = self.run + 1 if nonfinite else 0
        return bool(self.limit) and self.run >= self.limit

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of this rule."""
        return {"run": self.run}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()`."""
        self.run = state["run"]
