"""Byte-level text: files read as bytes, cut into fixed-length windows for language models."""

from __future__ import annotations

import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxdist.base.errors import UserError


def stdlib_sources() -> list[Path]:
    """The Python standard library's own top-level `.py` files (real text, always there)."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def read_bytes(paths: Sequence[Path], max_bytes: int = 0) -> np.ndarray:
    """The files' bytes, in order, separated by a NUL byte, as uint8 (capped at max_bytes)."""
    chunks, total = [], 0
    for path in paths:
        data = Path(path).read_bytes() + b"\0"
        chunks.append(data)
        total += len(data)
        if max_bytes and total >= max_bytes:
            break
    text = np.frombuffer(b"".join(chunks), np.uint8)
    return text[:max_bytes] if max_bytes else text


def text_files(path: str) -> list[Path]:
    """`path` itself if it is a file, else every file under it (sorted); the stdlib if empty."""
    if not path:
        return stdlib_sources()
    root = Path(path)
    if root.is_file():
        return [root]
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file())
        if files:
            return files
    raise UserError(f"data.path={path} is neither a text file nor a folder with files")


class ByteWindows:
    """A source of `tokens` windows of `length + 1` bytes (inputs and next-byte targets).

    Example i is `text[i * length : i * length + length + 1]`: consecutive windows share one
    byte, so every byte but the first is a target exactly once per epoch. Text too short for
    one window is refused with the advice `fix` (a caller names its own config keys).
    """

    def __init__(self, text: np.ndarray, length: int,
                 fix: str = "give more text or shorter windows"):
        if len(text) < length + 1:
            raise UserError(f"the text has {len(text)} bytes, fewer than one window of "
                            f"{length + 1}; {fix}")
        self.text, self.length = text, length

    def __len__(self) -> int:
        return (len(self.text) - 1) // self.length

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The windows at `indices` as int32 `tokens` `[len(indices), length + 1]`."""
        starts = np.asarray(indices, np.int64)[:, None] * self.length
        return {"tokens": self.text[starts + np.arange(self.length + 1)].astype(np.int32)}
