"""Keeping orbax's and tensorstore's own noise out of a failed save's one-line error."""

from __future__ import annotations

import logging
import sys
from typing import Any


class OrbaxErrors(logging.Filter):
    """Drops orbax's own ERROR logs: each failed write also raises, and jaxdist reports it.

    A full disk during a background save made orbax log the same failure with a traceback
    from several of its threads before the error reached jaxdist's one line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether to keep `record`: anything but an ERROR (or worse) logged by orbax."""
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def quiet_orbax_errors() -> None:
    """Install `OrbaxErrors` on absl's logger and `without_closed_loops`, each once."""
    absl = logging.getLogger("absl")
    if not any(isinstance(f, OrbaxErrors) for f in absl.filters):
        absl.addFilter(OrbaxErrors())
    if not getattr(sys.unraisablehook, "drops_closed_loops", False):
        sys.unraisablehook = without_closed_loops(sys.unraisablehook)


def without_closed_loops(hook: Any) -> Any:
    """`hook` (`sys.unraisablehook`), silent about asyncio's "Event loop is closed".

    After a failed write, orbax closes its event loop while tensorstore still has writes
    whose callbacks post to it; each printed that traceback (about 15 of them) before
    jaxdist's one line.
    """
    def quiet(unraisable: Any) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        hook(unraisable)

    quiet.drops_closed_loops = True  # type: ignore[attr-defined]
    return quiet
