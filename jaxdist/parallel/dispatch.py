"""How far the host may run ahead of the devices, and where it may wait for them."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

import jax

from jaxdist.base.pytree import PyTree


class InFlightLimit:
    """Lets at most `limit` dispatched steps run ahead of the host.

    JAX dispatches asynchronously, so a Python loop can queue hundreds of steps. Besides
    holding their buffers, that deadlocks XLA's CPU collectives (seen with jax 0.10.2 and
    8 CPU devices: an all-reduce waits forever for its 8th participant). Waiting for the
    output of step t - limit before dispatching step t keeps the devices busy (the next
    steps are already queued) without the runaway queue.
    """

    def __init__(self, limit: int = 2):
        self.limit = limit
        self._pending: collections.deque = collections.deque()

    def add(self, outputs: PyTree) -> None:
        """Register a dispatched step's outputs; wait if too many are still running."""
        self._pending.append(outputs)
        while len(self._pending) > self.limit:
            jax.block_until_ready(self._pending.popleft())


@contextlib.contextmanager
def host_reads() -> Iterator[None]:
    """Mark a place where the loop reads device values on purpose (log, eval, checkpoint).

    Everywhere else the training loop makes no device-to-host transfer, so that the host
    never waits for a step in flight. To check that on a GPU or TPU, run `fit` under
    `jax.transfer_guard_device_to_host("disallow_explicit")`: only these places are allowed.
    """
    with jax.transfer_guard_device_to_host("allow"):
        yield
