"""The one exception type that the CLI turns into a one-line message and exit status 2.

And the few sentences that many of its messages are built from.
"""

from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the person running jaxdist: a config, an experiment name, a data shape.

    The message is one line that names what is wrong and how to fix it. The CLI prints
    it without a traceback and exits with status 2.
    """


def choose_one_of(setting: str, choices: Iterable[object], problem: str = "is unknown") -> str:
    """The message for a value outside `choices`: "SETTING is unknown; choose one of: a, b"."""
    return f"{setting} {problem}; choose one of: {', '.join(map(str, choices))}"


def at_least(setting: str, minimum: float) -> str:
    """The message for a value below `minimum`: "SETTING must be >= MINIMUM"."""
    return f"{setting} must be >= {minimum}"
