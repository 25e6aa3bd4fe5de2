"""Pre-tokenized text: uint16 token files, cut into fixed-length windows.

Two formats, told apart by the first int32 of the file:

- nanoGPT's raw `.bin`: a flat array of little-endian uint16 tokens, no header.
- llm.c's shards: 256 int32 of header (magic 20240520, version 1 = uint16 tokens, the
  number of tokens), then that many uint16 tokens. A file that has the shape of such a
  header (a version of 1 or 2, a count that matches the file's size, zeros after it) but
  another magic number is refused, not read as tokens.

A folder holds training files and held-out files, told apart by name: a `*.bin` whose
name without `.bin` is `val`, ends in `_val`, or is either of those followed by `_` and
digits (nanoGPT's `val.bin`, llm.c's `fineweb_val_000000.bin`) is held out; every other
`*.bin` is for training (`train_interval_000.bin` included; the match is case-sensitive).

The files are never loaded whole, nor memory-mapped: each file is opened once and a batch
reads only its windows, one `os.pread` each. A file that shrinks while it is being read
(truncated by another program) is then one `UserError` naming it, where a read through a
memory map past the file's new end would kill the process with SIGBUS (a bus error, which
Python cannot catch).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from jaxdist.base.errors import UserError

LLMC_MAGIC = 20240520
LLMC_VERSION = 1  # uint16 tokens (llm.c's version 2 holds uint32 tokens)
LLMC_HEADER_INTS = 256
LLMC_HEADER_BYTES = LLMC_HEADER_INTS * 4
LLMC_TOKEN_BYTES = {1: 2, 2: 4}  # llm.c's versions and the size of their tokens
TOKEN_DTYPE = np.dtype("<u2")
HELD_OUT_NAMES = re.compile(r"(?:.*_)?val(?:_[0-9]+)?")  # a file's name without `.bin`
HELD_OUT_PATTERN = "val.bin, *_val.bin, val_N.bin or *_val_N.bin (N: digits)"
READ_CHUNK = 1 << 20  # tokens read at a time when a whole shard is scanned


def llmc_header(num_tokens: int) -> np.ndarray:
    """llm.c's 256-int32 header for a shard of `num_tokens` uint16 tokens."""
    header = np.zeros(LLMC_HEADER_INTS, "<i4")
    header[:3] = LLMC_MAGIC, LLMC_VERSION, num_tokens
    return header


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read up to `len(view)` bytes at `offset` into `view`; how many were read (0: at end).

    `os.preadv` reads straight into the buffer; where it is missing, `os.pread` and a copy.
    """
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[:len(data)] = data
    return len(data)


class TokenFile:
    """One token file, opened for reading: its path, a descriptor, and its size then.

    The descriptor stays open (as a memory map's would), so the file read is the one
    opened even if it is later renamed or deleted.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def __del__(self, close: Callable[[int], None] = os.close) -> None:
        """Close the descriptor (`os.close` bound here: at exit, module globals are gone)."""
        fd = getattr(self, "fd", None)
        if fd is not None:
            close(fd)

    def truncated(self) -> UserError:
        """The one-line error for this file having shrunk since it was opened."""
        now = os.fstat(self.fd).st_size
        return UserError(f"data.tokens file {self.path} was truncated while training "
                         f"({self.size} bytes when it was opened, {now} now); restore it and "
                         f"rerun the same command to resume from the newest checkpoint")

    def check_size(self) -> None:
        """Raise `truncated()` if the file is now shorter than when it was opened."""
        if os.fstat(self.fd).st_size < self.size:
            raise self.truncated()

    def read_into(self, out: np.ndarray, offset: int) -> None:
        """Fill the contiguous array `out` with the file's bytes from `offset` on.

        A short read (the file ends sooner than it did when opened) is `truncated()`.
        """
        view = memoryview(out).cast("B")
        done = 0
        while done < len(view):
            count = _pread_into(self.fd, view[done:], offset + done)
            if not count:
                raise self.truncated()
            done += count


class TokenShard:
    """`count` uint16 tokens of a `TokenFile` from byte `start` on: a file, or a part of one.

    It acts as a read-only 1-D array: `len`, slices (`shard[a:b]`, another `TokenShard`,
    nothing read) and `np.asarray(shard)` (every token, read now).
    """

    def __init__(self, file: TokenFile, start: int, count: int):
        self.file, self.start, self.count = file, start, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, key: slice) -> TokenShard:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a TokenShard takes only slices of step 1; use np.asarray first")
        first, stop, _ = key.indices(self.count)
        return TokenShard(self.file, self.start + first * TOKEN_DTYPE.itemsize,
                          max(stop - first, 0))

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None
                  ) -> np.ndarray:
        tokens = self.read(0, self.count)
        return tokens if dtype is None else tokens.astype(dtype)

    def read(self, first: int, count: int) -> np.ndarray:
        """Tokens `first` to `first + count` (within the shard), as uint16."""
        out = np.empty(count, TOKEN_DTYPE)
        if count:
            self.file.read_into(out, self.start + first * TOKEN_DTYPE.itemsize)
        return out

    def chunks(self, size: int = READ_CHUNK) -> Iterator[np.ndarray]:
        """Every token, in order, `size` at a time, each chunk read into the same buffer.

        So a scan holds one chunk at a time; a chunk is valid until the next is read.
        """
        buffer = np.empty(min(size, self.count), TOKEN_DTYPE)
        step = TOKEN_DTYPE.itemsize
        for first in range(0, self.count, size):
            chunk = buffer[:min(size, self.count - first)]
            self.file.read_into(chunk, self.start + first * step)
            yield chunk

    def windows(self, starts: np.ndarray, width: int) -> np.ndarray:
        """Tokens `[s, s + width)` for each `s` in `starts`, as uint16 `[len(starts), width]`.

        One read per window; the caller keeps `s + width` within the shard.
        """
        out = np.empty((len(starts), width), TOKEN_DTYPE)
        step = TOKEN_DTYPE.itemsize
        for row, first in enumerate(np.asarray(starts, np.int64).tolist()):
            self.file.read_into(out[row], self.start + first * step)
        return out


Shard = TokenShard | np.ndarray  # what TokenWindows cuts: a shard of a file, or an array


def open_token_file(path: str | Path) -> TokenShard:
    """The tokens of one raw or llm.c file, as a `TokenShard` (nothing is read yet).

    A raw file whose first two tokens happen to spell the magic number would be taken for
    llm.c's; its first token would be 55000, beyond GPT-2's 50257, so GPT-2 files never do.
    """
    file = TokenFile(Path(path))
    header = np.frombuffer(os.pread(file.fd, LLMC_HEADER_BYTES, 0), "<i4",
                           count=min(file.size, LLMC_HEADER_BYTES) // 4)
    if len(header) and header[0] == LLMC_MAGIC:
        return _open_llmc(file)
    _refuse_wrong_magic(file, header)
    if file.size % TOKEN_DTYPE.itemsize:
        raise UserError(f"{file.path} has an odd size ({file.size} bytes) so it is not a file "
                        f"of uint16 tokens; rewrite it (nanoGPT .bin or llm.c shard)")
    return TokenShard(file, 0, file.size // TOKEN_DTYPE.itemsize)


def _refuse_wrong_magic(file: TokenFile, header: np.ndarray) -> None:
    """Refuse a start that has the shape of llm.c's header but another magic number.

    The shape: a version of 1 or 2, a token count that gives exactly the file's size,
    and zeros in the rest of the 256 ints (no run of GPT-2 text looks like that).
    """
    if len(header) < LLMC_HEADER_INTS or header[3:].any():
        return
    version, count = int(header[1]), int(header[2])
    width = LLMC_TOKEN_BYTES.get(version)
    if width is None or count < 0 or file.size != LLMC_HEADER_BYTES + count * width:
        return
    raise UserError(f"{file.path} starts like an llm.c shard (version {version}, {count} "
                    f"tokens, which matches its size) but has magic number {header[0]} where "
                    f"llm.c's is {LLMC_MAGIC}; rewrite the shard (or fix its header's first "
                    f"int32)")


def _open_llmc(file: TokenFile) -> TokenShard:
    path, size = file.path, file.size
    if size < LLMC_HEADER_BYTES:
        raise UserError(f"{path} starts with llm.c's magic number but its header is cut short "
                        f"({size} of {LLMC_HEADER_BYTES} bytes); rewrite the shard")
    header = np.frombuffer(os.pread(file.fd, LLMC_HEADER_BYTES, 0), "<i4")
    version, count = int(header[1]), int(header[2])
    if version != LLMC_VERSION:
        raise UserError(f"{path} is an llm.c shard of version {version}; only version "
                        f"{LLMC_VERSION} (uint16 tokens) is read, so re-export it as GPT-2 "
                        f"tokens")
    expected = LLMC_HEADER_BYTES + count * TOKEN_DTYPE.itemsize
    if count < 0 or size != expected:
        raise UserError(f"{path}: its header says {count} tokens ({expected} bytes) but the "
                        f"file has {size} bytes; the shard is truncated or corrupt, rewrite it")
    return TokenShard(file, LLMC_HEADER_BYTES, count)


def is_held_out(path: Path) -> bool:
    """Whether a folder's `path` is a held-out file (see the module: `HELD_OUT_PATTERN`)."""
    return path.suffix == ".bin" and HELD_OUT_NAMES.fullmatch(path.stem) is not None


def token_files(path: str | Path) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of `path`: a file, or a folder's `*.bin` by name.

    In a folder, the files named as `HELD_OUT_PATTERN` says are held out (nanoGPT's
    `val.bin`, llm.c's `fineweb_val_000000.bin`); a single file has no held-out file of
    its own.
    """
    root = Path(path)
    if root.is_file():
        return [root], []
    if not root.is_dir():
        raise UserError(f"data.tokens={path} is neither a token file nor a folder; give a "
                        f".bin file or a folder of .bin shards")
    files = sorted(p for p in root.glob("*.bin") if p.is_file())
    train = [p for p in files if not is_held_out(p)]
    held_out = [p for p in files if is_held_out(p)]
    if not train:
        raise UserError(f"data.tokens={path} has no training shards (a *.bin not named "
                        f"{HELD_OUT_PATTERN}, which are held out); point it at a folder "
                        f"with training token files")
    return train, held_out


def describe_split(path: str | Path, fraction: float) -> str:
    """One line saying which of `path`'s files train and which are held out."""
    train, held_out = token_files(path)
    files = f"{len(train)} training file{'s' * (len(train) != 1)}"
    if held_out:
        names = ", ".join(p.name for p in held_out[:5])
        more = f" and {len(held_out) - 5} more" if len(held_out) > 5 else ""
        return f"data.tokens={path}: {files}; held out: {names}{more}"
    their = "its" if Path(path).is_file() else "their"
    why = "" if Path(path).is_file() else f"; none is named {HELD_OUT_PATTERN}"
    return (f"data.tokens={path}: {files}{why}, so the last {fraction:.0%} of {their} "
            f"tokens are held out")


def split_tail(shards: Sequence[Shard], fraction: float) -> tuple[list[Shard], list[Shard]]:
    """Cut the last `fraction` of the shards' tokens (taken end to end) off as held-out.

    Both sides keep the shard boundaries (slices of the shards; nothing is read).
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
                     ) -> tuple[list[TokenShard], list[TokenShard]]:
    """(training shards, held-out shards) of `path`, as `TokenShard`s (nothing read yet).

    The held-out shards are the folder's held-out files (`HELD_OUT_PATTERN`), or, without
    any, the last `held_out` fraction of the training tokens.
    """
    train_files, held_out_files = token_files(path)
    train = [open_token_file(p) for p in train_files]
    if held_out_files:
        return train, [open_token_file(p) for p in held_out_files]
    return split_tail(train, held_out)


def max_token(shards: Sequence[Shard]) -> int:
    """The largest token in the shards (-1 if they are empty).

    This reads every token once, a chunk at a time; at disk or page-cache speed that is
    fine up to a few GB of files.
    """
    return max((int(np.max(chunk)) for s in shards for chunk in _chunks(s)), default=-1)


def _chunks(shard: Shard) -> Iterator[np.ndarray]:
    """A shard's tokens a chunk at a time (a `TokenShard`) or at once (an array)."""
    if isinstance(shard, TokenShard):
        yield from shard.chunks()
    elif len(shard):
        yield np.asarray(shard)


def _windows(shard: Shard, starts: np.ndarray, width: int) -> np.ndarray:
    """Tokens `[s, s + width)` of `shard` for each `s` in `starts`, `[len(starts), width]`.

    A `TokenShard`'s file is first checked for having shrunk since it was opened (one
    `fstat`), so that truncation stops the run at the next batch, wherever its windows lie.
    """
    if isinstance(shard, TokenShard):
        shard.file.check_size()
        return shard.windows(starts, width)
    return np.asarray(shard)[np.asarray(starts, np.int64)[:, None] + np.arange(width)]


class TokenWindows:
    """A source of `tokens` windows of `length + 1` tokens from one or more shards.

    Within a shard, window i is `shard[i * length : i * length + length + 1]` (as
    `ByteWindows` cuts bytes); windows never cross from one shard into the next. Example
    numbers run through the shards in order.
    """

    def __init__(self, shards: Sequence[Shard], length: int, what: str = "the tokens",
                 fix: str = "give more tokens or shorter windows"):
        self.shards, self.length = list(shards), length
        counts = [max(len(s) - 1, 0) // length for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        if self.offsets[-1] == 0:
            longest = max((len(s) for s in self.shards), default=0)
            raise UserError(f"{what} hold no window of {length + 1} tokens (a shard needs at "
                            f"least that many, the longest has {longest}); {fix}")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The windows at `indices` as int32 `tokens` `[len(indices), length + 1]`."""
        indices = np.asarray(indices, np.int64)
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        out = np.empty((len(indices), self.length + 1), np.int32)
        for shard in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == shard)
            starts = (indices[rows] - self.offsets[shard]) * self.length
            out[rows] = _windows(self.shards[shard], starts, self.length + 1)
        return {"tokens": out}


def token_windows(path: str | Path, length: int, held_out: float, vocab_size: int,
                  fix: str = "give more tokens or shorter windows"
                  ) -> tuple[TokenWindows, TokenWindows]:
    """(training, held-out) windows of the token files at `path` (see `read_token_files`).

    Tokens at or beyond `vocab_size` are refused, naming the vocabulary size they need;
    files too short for one window are refused with the advice `fix`.
    """
    train, evaluation = read_token_files(path, held_out)
    largest = max_token(train + evaluation)
    if largest >= vocab_size:
        raise UserError(f"data.tokens={path} holds token {largest}, outside model.vocab_size="
                        f"{vocab_size} (tokens 0 to {vocab_size - 1}); set model.vocab_size="
                        f"{largest + 1} or more (GPT-2: 50257)")
    return (TokenWindows(train, length, f"the training tokens of {path}", fix),
            TokenWindows(evaluation, length, f"the held-out tokens of {path}", fix))
