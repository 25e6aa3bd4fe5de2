"""A tracker's own thread: its calls never make a training step wait, and a failure is one line.

A tracker talks to a server over the network (MLflow's client retries a failed request for
minutes), so every call is a task run in order by one background thread. The first task
that raises gives the tracker up for the rest of the run: one line on stderr, and the
tasks still queued are dropped (metrics.jsonl and TensorBoard keep every point).
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from typing import TextIO

_DONE = object()


class Sender:
    """Runs submitted tasks in order in a daemon thread, until one fails or `close` is called."""

    def __init__(self, name: str, where: str, stream: TextIO | None = None):
        self.name, self.where = name, where
        self.stream = stream
        self.failed: str | None = None  # the one line said about the failure
        self._tasks: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=f"jaxdist-{name}",
                                        daemon=True)
        self._thread.start()

    def submit(self, task: Callable[[], object]) -> None:
        """Run `task()` after the tasks submitted before it (nothing, once the tracker failed)."""
        if self.failed is None:
            self._tasks.put(task)

    def close(self, timeout: float) -> bool:
        """Let the queued tasks finish, waiting at most `timeout` seconds; True if they did."""
        self._tasks.put(_DONE)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def pending(self) -> int:
        """About how many tasks are still queued."""
        return self._tasks.qsize()

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is _DONE:
                return
            if self.failed is not None:
                continue
            try:
                task()
            except Exception as error:  # noqa: BLE001 - any failure of the tracker's client
                self._fail(error)

    def _fail(self, error: Exception) -> None:
        words = " ".join(str(error).split())
        if len(words) > 200:
            words = words[:197] + "..."
        self.failed = (f"jaxdist: {self.name} at {self.where} failed ({type(error).__name__}: "
                       f"{words}); training goes on without it, and metrics.jsonl and "
                       f"TensorBoard keep every point")
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(self.failed + "\n")
        stream.flush()
