"""SIGTERM/SIGINT: finish the current step, save, exit 0; a second signal exits at once."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType


class PreemptionWatch:
    """Installs handlers for SIGTERM and SIGINT while in a `with` block.

    The first signal only sets `requested` (the loop checks it between steps, saves a
    checkpoint and returns). A second one ends the process at once with status
    128 + signal number. Outside the main thread (where Python allows no handlers) it
    does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    entered = False  # whether any run of this process has reached its training loop

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a signal asked the run to stop."""
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            os._exit(128 + signum)
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> PreemptionWatch:
        PreemptionWatch.entered = True
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        """Put back the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
