"""SIGTERM/SIGINT: finish the current step and save; a second signal stops at once.

In the command line a second signal ends the process (status 128 + signal); from Python
(a notebook's "interrupt kernel", a script) it raises `KeyboardInterrupt`, so the kernel
stays usable. Either way the handlers that were there before are put back.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType


class PreemptionWatch:
    """Installs handlers for SIGTERM and SIGINT while in a `with` block.

    The first signal only sets `requested` (the loop checks it between steps, saves a
    checkpoint and returns). A second one ends the process at once with status
    128 + signal number when `exit_on_second_signal` (the CLI sets it), and raises
    `KeyboardInterrupt` otherwise. Outside the main thread (where Python allows no
    handlers) it does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    entered = False  # whether any run of this process has reached its training loop
    exit_on_second_signal = False

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a signal asked the run to stop."""
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            if self.exit_on_second_signal:
                os._exit(128 + signum)
            raise KeyboardInterrupt(f"a second {signal.Signals(signum).name}")
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
