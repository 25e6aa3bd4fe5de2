"""Reading `.npy`/`.npz` shard files through `os.pread`, never a memory map.

`open_npy` and `open_npz` parse a shard file's headers once and return `ShardArray`s, whose
rows are read on demand, a run of near rows per read: a file that shrinks while it is read
is then one `UserError` naming it, where a memory map would kill the process with SIGBUS.
"""

from __future__ import annotations

import errno
import io
import math
import os
import resource
import zipfile
from pathlib import Path

import numpy as np

from jaxdist.base.errors import UserError
from jaxdist.data.tokens import TokenFile

MERGE_GAP = 16 << 10  # bytes: rows at most this far apart are read in one go, the gap dropped
HEADER_BYTES = 1 << 16  # read to parse a .npy header (numpy writes at most 10 KB of one)
NPY_VERSIONS = ((1, 0), (2, 0), (3, 0))
HAVE_PREADV = hasattr(os, "preadv")
SHARD_FIX = "restore it or rewrite the folder with jaxdist.data.write_shards"


class ShardFile(TokenFile):
    """One shard file, opened once: `TokenFile`'s descriptor, size when opened, and reads.

    Only the message for a file that has shrunk differs: it names a data shard. A folder
    with more files than the process may open raises the soft limit to the hard one first.
    """

    def __init__(self, path: Path):
        try:
            super().__init__(path)
        except OSError as error:
            if error.errno != errno.EMFILE or not _raise_open_file_limit():
                raise _cannot_open(path, error) from None
            self.__init__(path)  # once more, under the raised limit

    def truncated(self) -> UserError:
        """The one-line error for this shard having shrunk since it was opened."""
        now = os.fstat(self.fd).st_size
        return UserError(f"data shard file {self.path} was truncated while training "
                         f"({self.size} bytes when it was opened, {now} now); restore it and "
                         f"rerun the same command to resume from the newest checkpoint")


def _raise_open_file_limit() -> bool:
    """Raise this process's soft limit on open files to its hard limit; False if it is there."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return True
        except (ValueError, OSError):
            return False
    return False


def _cannot_open(path: Path, error: OSError) -> UserError:
    """The one-line error for a shard file that cannot be opened."""
    if error.errno == errno.EMFILE:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return UserError(f"shard file {path} cannot be opened: this process may have only "
                         f"{soft} files open (ulimit -n) and the folder holds more shard files; "
                         f"raise ulimit -n, or rewrite the folder as fewer, larger shards (a "
                         f"larger rows_per_shard in write_shards)")
    return UserError(f"shard file {path} cannot be read ({error.strerror}); {SHARD_FIX}")


def _bytes_of(array: np.ndarray) -> np.ndarray:
    """The bytes of the C-contiguous `array`, as a flat uint8 view (a read fills it in place)."""
    return array.reshape(-1).view(np.uint8)


def _runs(rows: np.ndarray, unit_bytes: int) -> list[tuple[int, int, int, int]]:
    """Cut sorted, distinct `rows` into runs, each read whole: `(first, end, low, high)`.

    A run is `rows[first:end]`, the rows `low` to `high` (exclusive) of the file. It goes
    on while the rows it skips are at most `MERGE_GAP` bytes: one read more costs about as
    much as copying that many bytes more.
    """
    if not len(rows):
        return []
    skipped = (np.diff(rows) - 1) * unit_bytes
    cuts = np.flatnonzero(skipped > MERGE_GAP) + 1
    firsts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(rows)]])
    return list(zip(firsts.tolist(), ends.tolist(), rows[firsts].tolist(),
                    (rows[ends - 1] + 1).tolist(), strict=True))


def _read_exactly(file: ShardFile, view: memoryview, offset: int) -> None:
    """Fill `view` with the bytes of `file` from `offset` on: one `os.preadv` as a rule.

    A short read goes on through `read_into`, which reads the rest or, at the file's end,
    raises `truncated()`; so does every read where `os.preadv` is missing. (This is
    called once per run of rows, so it is kept to one call when it can be.)
    """
    done = os.preadv(file.fd, [view], offset) if HAVE_PREADV else 0
    if done < len(view):
        file.read_into(np.frombuffer(view[done:], np.uint8), offset + done)


def _gather_into(file: ShardFile, base: int, rows: np.ndarray,
                 runs: list[tuple[int, int, int, int]], out: np.ndarray) -> None:
    """Fill `out[i]` with unit `rows[i]` of the C array at byte `base` of `file`.

    A unit has `out[0]`'s shape; `runs` are `_runs(rows, its size in bytes)`. A run of
    consecutive rows is read straight into `out`, one with gaps into a buffer first.
    """
    unit = out.dtype.itemsize * math.prod(out.shape[1:])
    view = memoryview(_bytes_of(out))
    for first, end, low, high in runs:
        if high - low == end - first:
            _read_exactly(file, view[first * unit:end * unit], base + low * unit)
        else:
            span = np.empty((high - low, *out.shape[1:]), out.dtype)
            _read_exactly(file, memoryview(_bytes_of(span)), base + low * unit)
            out[first:end] = span[rows[first:end] - low]


class ShardArray:
    """One array of a shard file: its dtype, shape, order, and the byte its data starts at.

    Its rows are read with `os.pread` (`read_rows`, `read_all`), so a file that shrinks
    while it is read is a `UserError`, where a memory map would die of SIGBUS.
    """

    def __init__(self, file: ShardFile, offset: int, dtype: np.dtype, shape: tuple[int, ...],
                 fortran: bool):
        self.file, self.offset, self.dtype, self.shape = file, offset, dtype, tuple(shape)
        self.fortran = fortran and len(self.shape) > 1  # a 1-D array is both orders at once
        self.nbytes = math.prod(self.shape) * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def read_all(self) -> np.ndarray:
        """Every row, read now in one go (a Fortran-ordered array as its own transpose)."""
        out = np.empty(self.shape[::-1] if self.fortran else self.shape, self.dtype)
        self.file.read_into(_bytes_of(out), self.offset)
        return out.T if self.fortran else out

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """The rows at `rows` (any order, repeats allowed) as `[len(rows), *shape[1:]]`.

        The distinct rows are read in order, a run of near rows at a time (`_runs`).
        """
        unique, inverse = np.unique(np.asarray(rows, np.int64), return_inverse=True)
        if self.fortran:
            got = self._read_fortran_rows(unique)
        else:
            got = np.empty((len(unique), *self.shape[1:]), self.dtype)
            _gather_into(self.file, self.offset, unique, _runs(unique, got[:1].nbytes), got)
        return got[inverse.reshape(-1)]

    def _read_fortran_rows(self, rows: np.ndarray) -> np.ndarray:
        """Sorted distinct rows of a Fortran-ordered array, one of its columns at a time.

        In Fortran order, each column (one element of every row) lies whole in the file.
        """
        size, rest = self.shape[0], self.shape[1:]
        runs = _runs(rows, self.dtype.itemsize)
        columns = np.empty((math.prod(rest), len(rows)), self.dtype)
        for number, column_out in enumerate(columns):
            start = self.offset + number * size * self.dtype.itemsize
            _gather_into(self.file, start, rows, runs, column_out)
        return columns.T.reshape((len(rows), *rest), order="F")


def _array_at(file: ShardFile, start: int, what: str) -> ShardArray:
    """The array whose `.npy` header starts at byte `start` of `file` (`what` names it)."""
    head = io.BytesIO(os.pread(file.fd, HEADER_BYTES, start))
    try:
        version = np.lib.format.read_magic(head)
        if version not in NPY_VERSIONS:
            raise ValueError(f"unknown .npy version {version}")
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(head)
    except (ValueError, TypeError) as error:
        raise UserError(f"{what} is not a .npy array ({error}); shards must hold arrays "
                        f"written by numpy.save or jaxdist.data.write_shards") from None
    if dtype.hasobject:
        raise UserError(f"{what} holds Python objects; only plain arrays are allowed")
    if not shape:
        raise UserError(f"{what} holds a single value of shape (); every shard array needs "
                        f"one row per example, so rewrite it with a first axis")
    array = ShardArray(file, start + head.tell(), dtype, shape, fortran)
    if array.offset + array.nbytes > file.size:
        raise UserError(f"{what} is cut short: its header says {dtype}{shape}, "
                        f"{array.nbytes} bytes from byte {array.offset}, but the file has "
                        f"{file.size} bytes; {SHARD_FIX}")
    return array


def open_npy(path: Path) -> ShardArray:
    """The array of one `.npy` shard file: its header read now, its rows when served."""
    return _array_at(ShardFile(path), 0, str(path))


def open_npz(path: Path) -> dict[str, ShardArray]:
    """Every array of an uncompressed `.npz` shard file, found through its zip directory."""
    file = ShardFile(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if m.filename.endswith(".npy")]
    except zipfile.BadZipFile as error:
        raise UserError(f"shard file {path} is not a readable .npz file ({error}); "
                        f"{SHARD_FIX}") from None
    except OSError as error:
        raise _cannot_open(path, error) from None
    arrays = {}
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED:
            raise UserError(f"{path} is compressed, so its rows cannot be read one by one; "
                            f"write it with numpy.savez (not savez_compressed) or jaxdist "
                            f"write_shards")
        start = _member_data_start(file, member)
        arrays[member.filename[:-4]] = _array_at(file, start, f"{path}:{member.filename}")
    return arrays


def _member_data_start(file: ShardFile, member: zipfile.ZipInfo) -> int:
    """The byte of `file` where the data of the stored zip `member` begins."""
    local_header = os.pread(file.fd, 30, member.header_offset)
    if len(local_header) < 30 or local_header[:4] != b"PK\x03\x04":
        raise UserError(f"shard file {file.path} is damaged (the zip header of "
                        f"{member.filename} is not where its directory says); {SHARD_FIX}")
    name_length = int.from_bytes(local_header[26:28], "little")
    extra_length = int.from_bytes(local_header[28:30], "little")
    return member.header_offset + 30 + name_length + extra_length

