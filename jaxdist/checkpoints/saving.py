"""Checkpoint saves that overlap training: the state is copied to the host, then written.

A save has two parts. Copying the state from the devices to host memory must happen before
the next step (whose donated buffers replace it); it is quick (orbax copies the leaves that
stay split over the devices, each process its own chunks, before `begin` returns). Writing
it with orbax, hashing every file for the manifest and renaming the folder into place takes
seconds for a large model (the README's Performance section has the figures), and with
`checkpoint.background=true` it runs in a thread
while training goes on. The checkpoint is the same either way: the thread writes the copy
taken at the step, through the same atomic tmp-folder-then-rename commit and manifest.

At most one save is in flight. The next save, the end of the run, a signal or an error all
wait for it first, so a run never ends with a save half done, and an error of the write (a
full disk, say) is raised there, in one line, naming the checkpoint that is intact.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdist.base.pytree import PyTree
from jaxdist.checkpoints.store import CheckpointStore, PendingSave


def host_copy(tree: PyTree) -> PyTree:
    """A copy of a tree's host leaves that owns its memory (device arrays are kept as they are).

    On the CPU, `np.asarray` of a device array can share the device buffer; a save that
    outlives the step must not read a buffer that the next step may reuse.
    """
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.array(x, copy=True),
                        tree)


class CheckpointWriter:
    """Writes checkpoints of a `CheckpointStore`, in a background thread or in place."""

    def __init__(self, store: CheckpointStore, background: bool):
        self.store, self.background = store, background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, step: int, state: PyTree, meta: dict[str, Any],
             done: Callable[[Path, float], None], logical: PyTree = None,
             split: dict[str, int] | None = None) -> None:
        """Save `state` as the checkpoint of `step`, then call `done`.

        `state` holds host arrays and, where `split` names them, global arrays split over
        the devices (`CheckpointStore.begin`). `done(path, seconds)` runs when the
        checkpoint is committed (in the background thread, if it is one), with the seconds
        its writing took. Once this returns, the caller may reuse the state's buffers.
        """
        self.wait()
        started = time.perf_counter()
        if self.background:
            state = host_copy(state)
        pending = self.store.begin(step, state, meta, replace=True, logical=logical,
                                   split=split)
        if not self.background:
            self._commit(pending, started, done)
            return

        def write() -> None:
            try:
                self._commit(pending, started, done)
            except BaseException as error:  # raised in the training thread by wait()
                self._error = error

        self._thread = threading.Thread(target=write, name=f"jaxdist-save-{step}",
                                        daemon=False)
        self._thread.start()

    @staticmethod
    def _commit(pending: PendingSave, started: float,
                done: Callable[[Path, float], None]) -> None:
        path = pending.commit()
        done(path, time.perf_counter() - started)

    @property
    def in_flight(self) -> bool:
        """Whether a save is still being written."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self, raise_error: bool = True) -> None:
        """Wait for the save in flight (if any); raise its error, if it failed.

        `raise_error=False` drops the error: for a run that is already failing for another
        reason, whose own error is the one to report.
        """
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if raise_error:
                raise error
