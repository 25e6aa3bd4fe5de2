"""What jaxdist's commands share: one-line argument errors, and printing what was written."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from jaxdist.base.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are a `UserError`: one line, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Refuse the arguments: one line naming `--help`."""
        raise UserError(f"{message}; see {self.prog} --help")


def nonempty_path(text: str) -> Path:
    """An argparse type: a path that is not empty or blank (`""` would mean this folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is an empty path; give a folder")
    return Path(text)


def print_paths(write: Callable[[], Iterable[Path]]) -> int:
    """Print each path `write()` returns and return 0; or its `UserError` in one line, 2."""
    try:
        for path in write():
            print(path)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
