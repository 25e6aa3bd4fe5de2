"""Pre-tokenized text: memory-mapped uint16 token files, cut into fixed-length windows.

Two formats, told apart by the first int32 of the file:

- nanoGPT's raw `.bin`: a flat array of little-endian uint16 tokens, no header.
- llm.c's shards: 256 int32 of header (magic 20240520, version 1 = uint16 tokens, the
  number of tokens), then that many uint16 tokens.

The files are memory-mapped and never loaded whole: a batch reads only its windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxdist.errors import UserError

LLMC_MAGIC = 20240520
LLMC_VERSION = 1  # uint16 tokens (llm.c's version 2 holds uint32 tokens)
LLMC_HEADER_INTS = 256
LLMC_HEADER_BYTES = LLMC_HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
HELD_OUT_MARK = "val"


def llmc_header(num_tokens: int) -> np.ndarray:
    """llm.c's 256-int32 header for a shard of `num_tokens` uint16 tokens."""
    header = np.zeros(LLMC_HEADER_INTS, "<i4")
    header[:3] = LLMC_MAGIC, LLMC_VERSION, num_tokens
    return header


def open_token_file(path: str | Path) -> np.ndarray:
    """The tokens of one raw or llm.c file, memory-mapped as uint16 (nothing is read yet).

    A raw file whose first two tokens happen to spell the magic number would be taken for
    llm.c's; its first token would be 55000, beyond GPT-2's 50257, so GPT-2 files never do.
    """
    path = Path(path)
    size = path.stat().st_size
    first = np.fromfile(path, "<i4", count=1) if size >= 4 else np.zeros(0, "<i4")
    if len(first) and first[0] == LLMC_MAGIC:
        return _open_llmc(path, size)
    if size % TOKEN_DTYPE.itemsize:
        raise UserError(f"{path} has an odd size ({size} bytes) so it is not a file of uint16 "
                        f"tokens; rewrite it (nanoGPT .bin or llm.c shard)")
    if size == 0:
        return np.zeros(0, TOKEN_DTYPE)  # np.memmap refuses an empty file
    return np.memmap(path, TOKEN_DTYPE, mode="r")


def _open_llmc(path: Path, size: int) -> np.ndarray:
    if size < LLMC_HEADER_BYTES:
        raise UserError(f"{path} starts with llm.c's magic number but its header is cut short "
                        f"({size} of {LLMC_HEADER_BYTES} bytes); rewrite the shard")
    header = np.fromfile(path, "<i4", count=LLMC_HEADER_INTS)
    version, count = int(header[1]), int(header[2])
    if version != LLMC_VERSION:
        raise UserError(f"{path} is an llm.c shard of version {version}; only version "
                        f"{LLMC_VERSION} (uint16 tokens) is read, so re-export it as GPT-2 "
                        f"tokens")
    expected = LLMC_HEADER_BYTES + count * TOKEN_DTYPE.itemsize
    if count < 0 or size != expected:
        raise UserError(f"{path}: its header says {count} tokens ({expected} bytes) but the "
                        f"file has {size} bytes; the shard is truncated or corrupt, rewrite it")
    if count == 0:
        return np.zeros(0, TOKEN_DTYPE)
    return np.memmap(path, TOKEN_DTYPE, mode="r", offset=LLMC_HEADER_BYTES, shape=(count,))


def token_files(path: str | Path) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of `path`: a file, or a folder's `*.bin` by name.

    In a folder, files whose name contains `val` are held out (nanoGPT's `val.bin`, llm.c's
    `fineweb_val_000000.bin`); a single file has no held-out file of its own.
    """
    root = Path(path)
    if root.is_file():
        return [root], []
    if not root.is_dir():
        raise UserError(f"data.tokens={path} is neither a token file nor a folder; give a "
                        f".bin file or a folder of .bin shards")
    files = sorted(p for p in root.glob("*.bin") if p.is_file())
    train = [p for p in files if HELD_OUT_MARK not in p.name]
    held_out = [p for p in files if HELD_OUT_MARK in p.name]
    if not train:
        raise UserError(f"data.tokens={path} has no training shards (*.bin whose name lacks "
                        f"'{HELD_OUT_MARK}'); point it at a folder of token files")
    return train, held_out


def split_tail(shards: Sequence[np.ndarray], fraction: float
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Cut the last `fraction` of the shards' tokens (taken end to end) off as held-out.

    Both sides keep the shard boundaries (views of the memory maps; nothing is read).
    """
    total = sum(len(s) for s in shards)
    split = int(total * (1 - fraction))
    head, tail, start = [], [], 0
    for shard in shards:
        cut = min(max(split - start, 0), len(shard))
        head.extend([shard[:cut]] if cut else [])
        tail.extend([shard[cut:]] if cut < len(shard) else [])
        start += len(shard)
    return head, tail


def read_token_files(path: str | Path, held_out: float
                     ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(training shards, held-out shards) of `path`, memory-mapped uint16 arrays.

    The held-out shards are the folder's `val` files, or, without any, the last `held_out`
    fraction of the training tokens.
    """
    train_files, held_out_files = token_files(path)
    train = [open_token_file(p) for p in train_files]
    if held_out_files:
        return train, [open_token_file(p) for p in held_out_files]
    return split_tail(train, held_out)


def max_token(shards: Sequence[np.ndarray]) -> int:
    """The largest token in the shards (-1 if they are empty).

    This reads every token once; at memory bandwidth that is fine up to a few GB of files.
    """
    return max((int(np.max(s)) for s in shards if len(s)), default=-1)


class TokenWindows:
    """A source of `tokens` windows of `length + 1` tokens from one or more shards.

    Within a shard, window i is `shard[i * length : i * length + length + 1]` (as
    `ByteWindows` cuts bytes); windows never cross from one shard into the next. Example
    numbers run through the shards in order.
    """

    def __init__(self, shards: Sequence[np.ndarray], length: int, what: str = "the tokens"):
        self.shards, self.length = list(shards), length
        counts = [max(len(s) - 1, 0) // length for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        if self.offsets[-1] == 0:
            raise UserError(f"{what} hold no window of {length + 1} tokens (a shard needs at "
                            f"least that many); give more tokens or a smaller model.seq_len")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The windows at `indices` as int32 `tokens` `[len(indices), length + 1]`."""
        indices = np.asarray(indices, np.int64)
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        out = np.empty((len(indices), self.length + 1), np.int32)
        steps = np.arange(self.length + 1)
        for shard in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == shard)
            starts = (indices[rows] - self.offsets[shard]) * self.length
            out[rows] = self.shards[shard][starts[:, None] + steps]
        return {"tokens": out}


def token_windows(path: str | Path, length: int, held_out: float, vocab_size: int
                  ) -> tuple[TokenWindows, TokenWindows]:
    """(training, held-out) windows of the token files at `path` (see `read_token_files`).

    Tokens at or beyond `vocab_size` are refused, naming the vocabulary size they need.
    """
    train, evaluation = read_token_files(path, held_out)
    largest = max_token(train + evaluation)
    if largest >= vocab_size:
        raise UserError(f"data.tokens={path} holds token {largest}, outside model.vocab_size="
                        f"{vocab_size} (tokens 0 to {vocab_size - 1}); set model.vocab_size="
                        f"{largest + 1} or more (GPT-2: 50257)")
    return (TokenWindows(train, length, f"the training tokens of {path}"),
            TokenWindows(evaluation, length, f"the held-out tokens of {path}"))
