"""The hook that sends a run's logged points to one experiment tracker, off the training thread.

`TrackerHook` turns the loop's moments into a tracker's calls (`Tracker`): open (or continue)
the tracker's run when the loop starts, send the logged points, finish at the end. Each
call is a task of the tracker's own thread (`Sender`), so a slow or dead server never makes
a step wait; the end of the run waits for the queued points at most `drain_seconds`.
Points go out together, at most one request every `send_every` seconds: a request costs
the tracker's thread far more than a point does, and that thread shares the host with the
loop.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from jaxdist.base.config import flatten, to_dict
from jaxdist.loop.hooks import Hook, Run
from jaxdist.loop.metrics import TIMING_KEYS
from jaxdist.loop.trackers.sender import Sender

SEND_EVERY = 1.0  # the least time between two requests of a tracker's thread (seconds)
# (step, split, values) of one logged point
Point = tuple[int, str, dict[str, float]]


@dataclass
class RunContext:
    """What a tracker is told of the run when it opens (or continues) its own run."""

    experiment: str  # the jaxdist experiment's name
    settings: dict[str, Any]  # the resolved config, as dotted keys
    workdir: Path | None
    run_name: str | None
    start_step: int  # 0, or the step the run resumes from
    earlier: list[Point] = field(default_factory=list)  # metrics.jsonl's points up to it


class Tracker(Protocol):
    """One experiment tracker's client, called from its own thread, in order."""

    name: str  # e.g. "MLflow"
    where: str  # e.g. its tracking URI

    def open(self, context: RunContext) -> None:
        """Start the tracker's run, or continue the one this workdir's run started."""

    def log(self, points: list[Point]) -> None:
        """Send logged points, in the order logged (finite values, named as in metrics.jsonl)."""

    def finish(self, status: str, checkpoint: Path | None) -> None:
        """End the tracker's run with `status`, naming its last `checkpoint`.

        `status`: "FINISHED", "KILLED" (preempted: a rerun continues it) or "FAILED".
        """


def tracked_values(values: dict[str, float]) -> dict[str, float]:
    """The values of a point that a tracker gets: those of metrics.jsonl that are finite.

    metrics.jsonl writes a non-finite value as null; like TensorBoard, a tracker gets no
    point for it.
    """
    return {name: float(value) for name, value in values.items()
            if name not in TIMING_KEYS and math.isfinite(value)}


class TrackerHook(Hook):
    """Sends every logged point of process 0 to `tracker`, in its own thread."""

    def __init__(self, tracker: Tracker, experiment: str, drain_seconds: float = 30.0,
                 send_every: float | None = None):
        self.tracker, self.experiment = tracker, experiment
        self.drain_seconds = drain_seconds
        self.send_every = SEND_EVERY if send_every is None else send_every
        self._sender: Sender | None = None
        self._points: list[Point] = []  # logged, not yet handed to the tracker
        self._send_queued = False
        self._last_send = -math.inf
        self._lock = threading.Lock()

    def on_start(self, run: Run) -> None:
        """Open the tracker's run (in the tracker's thread)."""
        t = run.config.tracking
        workdir = run.logger.workdir
        settings = flatten(to_dict(run.config))
        name = t.run_name or (workdir.name if workdir is not None else None)
        earlier = [(r["step"], r["split"], tracked_values(
            {k: v for k, v in r.items() if k not in ("step", "split") and v is not None}))
            for r in run.logger.records]
        context = RunContext(self.experiment, settings, workdir, name, run.step, earlier)
        self._sender = Sender(self.tracker.name, self.tracker.where)
        self._sender.submit(partial(self.tracker.open, context))

    def after_log(self, run: Run, split: str, values: dict[str, float]) -> None:
        """Queue the point for the tracker; its thread sends it within `send_every` s."""
        if self._sender is None or self._sender.failed is not None:
            return  # a tracker given up keeps nothing more
        with self._lock:
            self._points.append((run.step, split, tracked_values(values)))
            if self._send_queued:
                return
            self._send_queued = True
        self._sender.submit(self._send)

    def on_stop(self, run: Run) -> None:
        """End the tracker's run, waiting at most `drain_seconds` for what is queued."""
        reason = run.stop_reason
        self._close(run, "KILLED" if reason == "preempted" else "FINISHED", self.drain_seconds)

    def settle(self, run: Run) -> None:
        """The run is failing: mark the tracker's run failed, waiting a few seconds at most."""
        self._close(run, "FAILED", min(self.drain_seconds, 10.0))

    def _send(self) -> None:
        """In the tracker's thread: the points logged so far, in one call."""
        time.sleep(max(0.0, self._last_send + self.send_every - time.monotonic()))
        with self._lock:
            points, self._points, self._send_queued = self._points, [], False
        self._last_send = time.monotonic()
        if points:
            self.tracker.log(points)

    def _close(self, run: Run, status: str, timeout: float) -> None:
        sender, self._sender = self._sender, None
        if sender is None:
            return
        self._last_send = -math.inf  # the last points go at once
        sender.submit(self._send)
        sender.submit(lambda: self.tracker.finish(status, run.checkpoint))
        if not sender.close(timeout) and sender.failed is None:
            run.logger.say(f"jaxdist: {self.tracker.name} at {self.tracker.where} had not "
                           f"taken the run's last points after {timeout:.0f} s; training is "
                           f"done, and metrics.jsonl and TensorBoard keep every point")
