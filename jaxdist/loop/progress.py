"""The live progress line on a terminal (tqdm): step/total, loss, steps/s, examples/s, ETA."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from tqdm import tqdm

# For a terminal that reports no size (e.g. under `script`), where tqdm would draw nothing.
FALLBACK_SIZE = {"ncols": 100, "nrows": 24}


def terminal_size(stream: TextIO) -> tuple[int, int]:
    """(columns, lines) the terminal behind `stream` reports; (0, 0) if it reports none."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return 0, 0
    return size.columns, size.lines


class Progress:
    """A tqdm bar counting steps, showing the latest train loss and examples/s after it."""

    def __init__(self, stream: TextIO, total: int, initial: int = 0):
        size = {"dynamic_ncols": True} if all(terminal_size(stream)) else FALLBACK_SIZE
        self._bar = tqdm(total=total, initial=initial, file=stream, unit="step",
                         smoothing=0.1, **size)

    @classmethod
    def if_terminal(cls, stream: TextIO, total: int, initial: int = 0) -> Progress | None:
        """A progress bar for a terminal or a notebook, else None (plain lines instead)."""
        if in_notebook(stream):
            return NotebookProgress(stream, total, initial)
        isatty = getattr(stream, "isatty", None)
        return cls(stream, total, initial) if callable(isatty) and isatty() else None

    def advance(self) -> None:
        """Count one step."""
        self._bar.update(1)

    def show(self, line: str, split: str, values: dict[str, float]) -> None:
        """Print a logged point above the bar; a train point's loss goes on the bar at once."""
        self.write(line)
        if split != "train":
            return
        postfix = {}
        if "loss" in values:
            postfix["loss"] = f"{values['loss']:.4g}"
        if "examples_per_sec" in values:
            postfix["ex/s"] = f"{values['examples_per_sec']:.0f}"
        if postfix:
            self._bar.set_postfix(postfix)

    def note(self, text: str) -> None:
        """Show `text` after the bar (e.g. while the first step compiles); "" clears it."""
        self._bar.set_postfix_str(text)

    def write(self, line: str) -> None:
        """Print a line above the bar, wrapped at its fields to the terminal's width."""
        for part in wrap_fields(line, self._bar.ncols or FALLBACK_SIZE["ncols"]):
            self._bar.write(part, file=self._bar.fp)

    def close(self) -> None:
        """End the bar."""
        self._bar.close()


def wrap_fields(line: str, width: int, indent: str = "    ") -> list[str]:
    """`line` cut into lines of at most `width` characters between its fields.

    A logged point's fields are separated by two spaces; a field is never cut, and the
    lines after the first are indented. A field longer than a line stands alone.
    """
    fields = line.split("  ")
    lines, current = [], fields[0]
    for field in fields[1:]:
        if len(current) + 2 + len(field) <= width:
            current += "  " + field
        else:
            lines.append(current)
            current = indent + field
    lines.append(current)
    return lines


def in_notebook(stream: TextIO) -> bool:
    """Whether `stream` is the output of a Jupyter kernel's cell (Colab, Kaggle, Jupyter)."""
    return "ipykernel" in sys.modules and stream is sys.stdout and not stream.isatty()


class NotebookProgress(Progress):
    """tqdm's notebook form (a widget where ipywidgets is installed, else text)."""

    def __init__(self, stream: TextIO, total: int, initial: int = 0):
        from tqdm.auto import tqdm as auto_tqdm

        self._bar = auto_tqdm(total=total, initial=initial, unit="step", smoothing=0.1)

    def write(self, line: str) -> None:
        """Print a line above the bar (in the cell's output, which wraps it itself)."""
        self._bar.write(line)

    def show(self, line: str, split: str, values: dict[str, float]) -> None:
        """Print a logged point; a train point's loss goes on the bar at once."""
        self.write(line)
        if split == "train" and "loss" in values:
            self._bar.set_postfix({"loss": f"{values['loss']:.4g}"})
