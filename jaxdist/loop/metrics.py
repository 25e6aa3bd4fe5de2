"""Metrics: summed on the devices every step, read back only when they are logged.

`MetricWindow` holds the per-step sums between two log points; `MetricsLogger` writes the
logged points to `metrics.jsonl`, TensorBoard event files and the console.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO

import jax

from jaxdist.base.errors import UserError
from jaxdist.base.files import write_text_atomically
from jaxdist.base.records import METRICS_FILE, read_records, to_json_line
from jaxdist.loop.progress import Progress
from jaxdist.parallel.backend import Backend
from jaxdist.parallel.dispatch import host_reads
from jaxdist.step.norms import NORM_KEYS
from jaxdist.step.steps import LOSS_SUM, NONFINITE, WEIGHT_SUM

# Values that vary from run to run on the same inputs: shown on the console and in
# TensorBoard only, so that metrics.jsonl is a reproducible record.
TIMING_KEYS = ("steps_per_sec", "examples_per_sec")


class MetricWindow:
    """Per-step summed metrics between two log points.

    Holding a reference to a device array does not wait for it, so steps keep being
    dispatched; `sync` (called at log and checkpoint points) is the only place that waits
    and copies to the host. Host totals are added up in step order, so a window restored
    from a checkpoint ends with the very same floats as an uninterrupted one. The norms
    (`grad_norm`, ...) are not summed: a point shows those of its last step, the one step
    of the window that computed them.
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, jax.Array]] = []
        self.totals: dict[str, float] = {}
        self.latest: dict[str, float] = {}  # the norms of the last step synced
        self.steps = 0
        self._started = time.perf_counter()

    def add(self, sums: dict[str, jax.Array]) -> None:
        """Remember one step's summed metrics (still on the devices)."""
        self._pending.append(sums)

    def sync(self, backend: Backend, also: Any = None) -> tuple[list[dict[str, float]], Any]:
        """Copy the pending steps to the host, add them up, and return them in order.

        Everything comes back in one transfer (`Backend.small_values_to_host`), together
        with `also` (a tree of small replicated values read at the same point, e.g. the
        learning rate), which is returned as numpy.
        """
        if not self._pending and also is None:
            return [], None
        with host_reads():
            pending, also = backend.small_values_to_host((self._pending, also))
        rows = [{name: float(value) for name, value in sums.items()} for sums in pending]
        self._pending = []
        for row in rows:
            for name, value in row.items():
                if name in NORM_KEYS:
                    self.latest[name] = value
                else:
                    self.totals[name] = self.totals.get(name, 0.0) + value
        self.steps += len(rows)
        return rows, also

    def summarize(self, backend: Backend) -> dict[str, float]:
        """Exact weighted means over the window, plus counts and rates; resets the window."""
        self.sync(backend)
        totals = dict(self.totals)
        elapsed = time.perf_counter() - self._started
        weight = totals.pop(WEIGHT_SUM, 0.0)
        nonfinite = totals.pop(NONFINITE, None)
        names = sorted(totals, key=lambda name: (name != LOSS_SUM, name))  # the loss first
        values = {name: totals[name] / weight if weight else math.nan for name in names}
        values["examples"] = weight
        if nonfinite is not None:
            values[NONFINITE] = nonfinite
        values.update(self.latest)
        values["steps_per_sec"] = self.steps / elapsed if elapsed > 0 else math.nan
        values["examples_per_sec"] = weight / elapsed if elapsed > 0 else math.nan
        self.totals, self.latest, self.steps = {}, {}, 0
        self._started = time.perf_counter()
        return values

    def state(self) -> dict[str, Any]:
        """The partial sums of the window so far (call `sync` first), for a checkpoint."""
        return {"totals": dict(self.totals), "steps": self.steps}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue a window from `state()`."""
        self.totals, self.steps = dict(state["totals"]), int(state["steps"])


# Where a point's values go: the loss first, the experiment's metrics by name, then these.
TRAILING_KEYS = ("examples", NONFINITE, *NORM_KEYS, "lr", *TIMING_KEYS)


def in_order(values: dict[str, float]) -> dict[str, float]:
    """`values` in the order a point shows them (the same however they were gathered)."""
    def rank(name: str) -> tuple[int, str]:
        if name == LOSS_SUM:
            return (0, "")
        if name in TRAILING_KEYS:
            return (2 + TRAILING_KEYS.index(name), "")
        return (1, name)

    return {name: values[name] for name in sorted(values, key=rank)}


class MetricsLogger:
    """Writes logged points to `metrics.jsonl` and TensorBoard (with a workdir) and the console.

    `metrics.jsonl` is strict JSON, one point per line (a non-finite value is `null`). On a
    terminal the console shows a live progress line (step/total, loss, steps/s,
    examples/s, ETA) with the logged points printed above it; elsewhere, one plain line
    per logged point.
    """

    def __init__(self, workdir: Path | None = None, stream: TextIO | None = sys.stdout,
                 total_steps: int | None = None):
        self.workdir = Path(workdir) if workdir is not None else None
        self.path = self.workdir / METRICS_FILE if self.workdir is not None else None
        self.stream = stream
        self.total_steps = total_steps
        self.records: list[dict[str, Any]] = []
        self.progress: Progress | None = None
        self._tensorboard = None
        self._news: deque[str] = deque()  # lines from other threads, printed by this one

    def resume_at(self, step: int) -> None:
        """Keep the logged points up to `step` (and no torn line); later ones will be redone.

        TensorBoard's event files are opened with `purge_step=step + 1`, so TensorBoard
        drops the points a crashed run logged after `step`, as `metrics.jsonl` does.
        """
        kept = []
        if self.path is not None and (self.path.exists() or self.path.is_symlink()):
            fix = ("repair or remove it (the checkpoints hold the run), or start over with "
                   "--restart")
            kept = [r for r in read_records(self.path, fix) if r["step"] <= step]
            write_text_atomically(self.path, "".join(to_json_line(r) for r in kept))
        self.records = kept
        if self.workdir is not None:
            from jaxdist.loop.events import EventFile

            try:
                self._tensorboard = EventFile(self.workdir / "tensorboard", purge_step=step + 1)
            except OSError as error:
                raise self._tensorboard_failed(error) from None

    def start_progress(self, initial: int) -> None:
        """Show the live progress line (only on a terminal)."""
        if self.stream is not None and self.total_steps:
            self.progress = Progress.if_terminal(self.stream, self.total_steps, initial)

    def advance(self) -> None:
        """One more step done."""
        if self.progress is not None:
            self.progress.advance()

    def log(self, step: int, split: str, values: dict[str, float]) -> dict[str, Any]:
        """Record one point: `{"step": step, "split": split, **values}` minus timing."""
        self._print_news()
        values = in_order(values)
        record = {"step": step, "split": split}
        record.update({k: v for k, v in values.items() if k not in TIMING_KEYS})
        self.records.append(record)
        if self.path is not None:
            try:
                with self.path.open("a") as f:
                    f.write(to_json_line(record))
            except OSError as error:
                raise UserError(f"could not write {self.path} ({error.strerror}); free space "
                                f"and rerun the same command to resume from the newest "
                                f"checkpoint") from None
        if self._tensorboard is not None:
            try:  # TensorBoard has no point for NaN (null in JSONL)
                self._tensorboard.add_scalars(step, {f"{split}/{name}": value for name, value
                                                     in values.items() if math.isfinite(value)})
            except OSError as error:
                raise self._tensorboard_failed(error) from None
        line = self._format(step, split, values)
        if self.progress is not None:
            self.progress.show(line, split, values)
        elif self.stream is not None:
            self.stream.write(line + "\n")
            self.stream.flush()
        return record

    def say_later(self, line: str) -> None:
        """Print `line` with the next console output (callable from any thread)."""
        self._news.append(line)

    def say(self, line: str) -> None:
        """Print one line of news on the console."""
        self._print_news()
        self._print(line)

    def _print_news(self) -> None:
        while self._news:
            self._print(self._news.popleft())

    def _print(self, line: str) -> None:
        if self.progress is not None:
            self.progress.write(line)
        elif self.stream is not None:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self, raise_error: bool = True) -> None:
        """Finish the progress line and the event file.

        A failure to write the event file is a `UserError`, unless `raise_error` is False
        (the run is already failing for another reason, whose error is the one to report).
        """
        self._print_news()
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self._tensorboard is not None:
            try:
                self._tensorboard.close()
                self._tensorboard = None
            except OSError as error:
                failure = self._tensorboard_failed(error)
                if raise_error:
                    raise failure from None

    def _tensorboard_failed(self, error: OSError) -> UserError:
        """Give the event writer up (quietly) and return the one line of its failure."""
        writer, self._tensorboard = self._tensorboard, None
        if writer is not None:
            writer.abandon()
        return UserError(f"could not write TensorBoard's events in {self.workdir / 'tensorboard'} "
                         f"({error.strerror}); {self.path} and the checkpoints are intact: free "
                         f"space and rerun the same command to resume from the newest "
                         f"checkpoint")

    def _format(self, step: int, split: str, values: dict[str, float]) -> str:
        where = f"{step}/{self.total_steps}" if self.total_steps else str(step)
        parts = [f"{split:5s} step {where}"]
        for name, value in values.items():
            if name == "examples" or name == NONFINITE:
                if name == "examples" or value:
                    parts.append(f"{name} {int(value)}")
            elif name == "steps_per_sec":
                parts.append(f"{value:.1f} steps/s")
            elif name == "examples_per_sec":
                parts.append(f"{value:.0f} examples/s")
            else:
                parts.append(f"{name} {value:.6g}")
        return "  ".join(parts)
