"""Assemble batches in a background thread and keep the next ones already on the devices."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_DONE = object()


class DevicePrefetcher:
    """Iterates `put(batch)` over `batches`, with host work and transfers done ahead.

    A background thread takes each host batch (gathering rows, padding) and starts its
    transfer with `put` (the backend's `put_batch`), keeping up to `depth` placed batches
    waiting, so the step never waits for data. A batch object that comes again (a full
    batch) is not copied again.

    `state()` is the loader position after the last batch handed out, not after the ones
    prefetched, so a checkpoint taken between steps resumes exactly. `batches` may be any
    iterator; if it has `state()`, that is what is tracked.
    """

    def __init__(self, batches: Iterator[Any], put: Callable[[Any], Any], depth: int = 2):
        self._batches = batches
        self._put = put
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._state = self._position()
        self._thread = threading.Thread(target=self._fill, name="jaxdist-prefetch",
                                        daemon=True)
        self._thread.start()

    def _position(self) -> Any:
        state = getattr(self._batches, "state", None)
        return state() if callable(state) else None

    def _fill(self) -> None:
        last_host, last_device = None, None
        try:
            for batch in self._batches:
                if batch is not last_host:
                    last_host, last_device = batch, self._put(batch)
                if not self._offer((last_device, self._position())):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            self._offer(error)
            return
        self._offer(_DONE)

    def _offer(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is _DONE:
            self._queue.put(_DONE)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, self._state = item
        return batch

    def state(self) -> Any:
        """The position of the underlying iterator after the last batch handed out."""
        return self._state

    def close(self) -> None:
        """Stop the background thread."""
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> DevicePrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
