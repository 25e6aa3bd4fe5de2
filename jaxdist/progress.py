"""The live progress line on a terminal (tqdm): step/total, loss, steps/s, examples/s, ETA."""

from __future__ import annotations

from typing import TextIO

from tqdm import tqdm


class Progress:
    """A tqdm bar counting steps, showing the latest loss and examples/s after it."""

    def __init__(self, stream: TextIO, total: int, initial: int = 0):
        self._bar = tqdm(total=total, initial=initial, file=stream, unit="step",
                         dynamic_ncols=True, smoothing=0.1)

    @classmethod
    def if_terminal(cls, stream: TextIO, total: int, initial: int = 0) -> Progress | None:
        """A progress line when `stream` is a terminal, else None (plain lines instead)."""
        isatty = getattr(stream, "isatty", None)
        return cls(stream, total, initial) if callable(isatty) and isatty() else None

    def advance(self) -> None:
        """Count one step."""
        self._bar.update(1)

    def show(self, line: str, values: dict[str, float]) -> None:
        """Print a logged point above the bar and put its loss on the bar."""
        self._bar.write(line, file=self._bar.fp)
        postfix = {}
        if "loss" in values:
            postfix["loss"] = f"{values['loss']:.4g}"
        if "examples_per_sec" in values:
            postfix["ex/s"] = f"{values['examples_per_sec']:.0f}"
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)

    def write(self, line: str) -> None:
        """Print a line above the bar."""
        self._bar.write(line, file=self._bar.fp)

    def close(self) -> None:
        """End the bar."""
        self._bar.close()
