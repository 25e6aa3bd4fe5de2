"""Keep the next batches on their way to the devices while the current step runs."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def prefetch_to_devices(batches: Iterable[Any], put: Callable[[Any], Any],
                        size: int = 2) -> Iterator[Any]:
    """Yield `put(batch)` for each batch, with `size` transfers started ahead.

    `jax.device_put` returns at once and copies in the background, so starting the transfer
    of batch t+1 and t+2 before step t runs hides the copy. A batch object that is yielded
    again (a full batch) is not copied again.
    """
    queue: collections.deque = collections.deque()
    last_host, last_device = None, None
    iterator = iter(batches)

    def enqueue() -> bool:
        nonlocal last_host, last_device
        try:
            batch = next(iterator)
        except StopIteration:
            return False
        if batch is not last_host:
            last_host, last_device = batch, put(batch)
        queue.append(last_device)
        return True

    for _ in range(size):
        if not enqueue():
            break
    while queue:
        yield queue.popleft()
        enqueue()
