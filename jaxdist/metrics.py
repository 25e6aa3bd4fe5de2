"""Metrics: summed on the devices every step, read back only when they are logged."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

from jaxdist.parallel import Backend
from jaxdist.step import LOSS_SUM, WEIGHT_SUM


class MetricWindow:
    """Collects the per-step summed metrics (still on the devices) between two log points.

    Holding a reference to a device array does not wait for it, so steps keep being
    dispatched; `summarize` is the only place that waits and copies to the host.
    """

    def __init__(self) -> None:
        self._steps: list[dict[str, jax.Array]] = []
        self._started = time.perf_counter()

    def add(self, sums: dict[str, jax.Array]) -> None:
        """Remember one step's summed metrics."""
        self._steps.append(sums)

    def __len__(self) -> int:
        return len(self._steps)

    def summarize(self, backend: Backend) -> dict[str, float]:
        """Return exact weighted means over the window, plus `examples` and `steps_per_sec`.

        Resets the window.
        """
        totals: dict[str, float] = {}
        for sums in backend.first_copy(self._steps):
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + float(np.asarray(value, np.float64))
        elapsed = time.perf_counter() - self._started
        steps = len(self._steps)
        self._steps = []
        self._started = time.perf_counter()
        weight = totals.pop(WEIGHT_SUM, 0.0)
        names = sorted(totals, key=lambda name: (name != LOSS_SUM, name))  # the loss first
        means = {name: totals[name] / weight if weight else math.nan for name in names}
        means["examples"] = weight
        means["steps_per_sec"] = steps / elapsed if elapsed > 0 else math.nan
        return means


# Values that vary from run to run on the same inputs: shown on the console only, so that
# metrics.jsonl is a reproducible record.
TIMING_KEYS = ("steps_per_sec",)


class MetricsLogger:
    """Writes logged points to `metrics.jsonl` (when given a workdir) and to the console."""

    def __init__(self, workdir: Path | None = None, stream: TextIO | None = sys.stdout,
                 total_steps: int | None = None):
        self.path = Path(workdir) / "metrics.jsonl" if workdir is not None else None
        self.stream = stream
        self.total_steps = total_steps
        self.records: list[dict[str, Any]] = []

    def log(self, step: int, split: str, values: dict[str, float]) -> dict[str, Any]:
        """Record one point: `{"step": step, "split": split, **values}` minus timing."""
        record = {"step": step, "split": split}
        record.update({k: v for k, v in values.items() if k not in TIMING_KEYS})
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.stream is not None:
            self.stream.write(self._format(step, split, values) + "\n")
            self.stream.flush()
        return record

    def _format(self, step: int, split: str, values: dict[str, float]) -> str:
        where = f"{step}/{self.total_steps}" if self.total_steps else str(step)
        parts = [f"{split:5s} step {where}"]
        for name, value in values.items():
            if name == "examples":
                parts.append(f"examples {int(value)}")
            elif name == "steps_per_sec":
                parts.append(f"{value:.1f} steps/s")
            else:
                parts.append(f"{name} {value:.6g}")
        return "  ".join(parts)
