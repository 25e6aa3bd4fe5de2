"""SIGTERM/SIGINT: finish the current step and save; a second signal stops at once.

In the command line a second signal ends the process (status 128 + signal); from Python
(a notebook's "interrupt kernel", a script) it raises `KeyboardInterrupt`, so the kernel
stays usable. Either way the handlers that were there before are put back.

Before the training loop, in the command line, a signal ends the start-up
(`StartupSignals`): it is held while jax and the experiment are imported (an exception
raised inside the import of a native extension can crash the interpreter), then raised as
`Interrupted`; and if library code swallows that exception, the loop refuses to start.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM that ends the command's start-up (`signum` says which)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StartupSignals:
    """The command line's SIGINT/SIGTERM handling until the training loop takes over.

    `install()` records a signal and, once `deliver()` has been called, raises
    `Interrupted` at once; until then (the imports) it only records it, and `deliver()`
    raises it. A second signal ends the process at once (status 128 + signal).
    """

    received: int | None = None
    raising = False

    @classmethod
    def install(cls) -> None:
        """Handle SIGINT and SIGTERM this way (main thread only)."""
        for sig in PreemptionWatch.SIGNALS:
            signal.signal(sig, cls._handle)
        default_hook = sys.unraisablehook

        def quiet(unraisable: Any) -> None:
            # Raised inside a callback that cannot raise (jax's garbage-collection hook):
            # not printed, since `PreemptionWatch` raises it again before the first step.
            if not isinstance(unraisable.exc_value, Interrupted):
                default_hook(unraisable)

        sys.unraisablehook = quiet

    @classmethod
    def _handle(cls, signum: int, frame: FrameType | None) -> None:
        if cls.received is not None:
            os._exit(128 + signum)
        cls.received = signum
        if cls.raising:
            raise Interrupted(signum)

    @classmethod
    def deliver(cls) -> None:
        """From now on raise at once; raise a signal that came while held."""
        cls.raising = True
        if cls.received is not None:
            raise Interrupted(cls.received)


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
        if StartupSignals.received is not None:  # an Interrupted that library code swallowed
            raise Interrupted(StartupSignals.received)
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
