"""Random-access data sources: a length, and rows by index as a dict of numpy arrays.

- `ArraySource`: in-memory arrays.
- `NpyFolderSource`: a folder of `.npy`/`.npz` shard files, never loaded whole nor
  memory-mapped: each batch reads its rows with `os.pread`; `write_shards` writes one.
- `MapSource`: anything with `__len__` and `__getitem__(i) -> dict` (a grain `MapDataset`,
  an ArrayRecord source wrapped to decode records, a Hugging Face `datasets.Dataset` with
  `.with_format("numpy")`); one with `__getitems__(list)` is read a batch at a time.

Every source offers `get_batch(indices) -> dict[name, array[len(indices), ...]]`.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import resource
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from jaxdist.data.tokens import TokenFile
from jaxdist.errors import UserError
from jaxdist.schema import Each, ListOf, describe_value, load_json

WEIGHT = "weight"
MANIFEST = "manifest.json"


@runtime_checkable
class Source(Protocol):
    """What the loader needs of a data set."""

    def __len__(self) -> int:
        """The number of examples."""

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The examples at `indices`, stacked along a new first axis."""


def validate_arrays(arrays: Mapping[str, np.ndarray], what: str = "data") -> int:
    """Check that `arrays` is a non-empty dict of equal-length arrays; return that length."""
    if not arrays:
        raise UserError(f"{what} has no arrays; give a dict such as {{'x': ..., 'y': ...}}")
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise UserError(f"{what} arrays differ in length ({lengths}); every array needs one "
                        f"row per example")
    n = next(iter(lengths.values()))
    if n == 0:
        raise UserError(f"{what} is empty; it needs at least one example")
    if WEIGHT in arrays:
        raise UserError(f"{what} may not contain a '{WEIGHT}' array; jaxdist adds it")
    return n


class ArraySource:
    """Examples held in memory as a dict of equal-length arrays."""

    def __init__(self, arrays: Mapping[str, np.ndarray], what: str = "data"):
        self.arrays = {name: np.asarray(a) for name, a in arrays.items()}
        self.size = validate_arrays(self.arrays, what)

    def __len__(self) -> int:
        return self.size

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Gather the rows at `indices` of every array."""
        return {name: a[indices] for name, a in self.arrays.items()}

    def column(self, name: str) -> np.ndarray:
        """All rows of one array."""
        return _column(self.arrays, name)


class MapSource:
    """Adapts any `len()`-able object whose `obj[i]` is a dict of arrays (or scalars)."""

    def __init__(self, dataset: Any, what: str = "data"):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise UserError(f"{what} must have __len__ and __getitem__; got "
                            f"{type(dataset).__name__}")
        self.dataset = dataset
        if len(dataset) == 0:
            raise UserError(f"{what} is empty; it needs at least one example")
        first = dataset[0]
        if not isinstance(first, Mapping):
            raise UserError(f"{what}[0] is a {type(first).__name__}; each example must be a "
                            f"dict of arrays")
        self.names = list(first)

    def __len__(self) -> int:
        return len(self.dataset)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Fetch the examples (in one call where the data set reads batches) and stack them.

        A data set with `__getitems__(list)` (Hugging Face `datasets`, grain, PyTorch's
        convention) is asked for the whole batch at once; others example by example.
        """
        keys = [int(i) for i in indices]
        many = getattr(self.dataset, "__getitems__", None)
        examples = many(keys) if callable(many) else [self.dataset[i] for i in keys]
        return {name: np.stack([np.asarray(e[name]) for e in examples]) for name in self.names}

    def column(self, name: str) -> np.ndarray:
        """One field of every example (reads them all)."""
        _column(dict.fromkeys(self.names), name)
        return np.stack([np.asarray(self.dataset[i][name]) for i in range(len(self))])


def _column(arrays: Mapping[str, Any], name: str) -> Any:
    if name not in arrays:
        raise UserError(f"the data has no array {name!r} (it has {', '.join(arrays)}); set "
                        f"loader.label_key to one of them")
    return arrays[name]


def column(source: Source, name: str) -> np.ndarray:
    """All values of array `name` of `source` (e.g. the labels, for balanced sampling)."""
    if hasattr(source, "column"):
        return np.asarray(source.column(name))
    return _column(source.get_batch(np.arange(len(source))), name)


def as_source(data: Any, what: str = "data") -> Source:
    """Wrap `data` as a source: a source as is, a dict of arrays, or a map-style data set."""
    if isinstance(data, Mapping):
        return ArraySource(data, what)
    if hasattr(data, "get_batch") and hasattr(data, "__len__"):
        if len(data) == 0:
            raise UserError(f"{what} is empty; it needs at least one example")
        return data
    return MapSource(data, what)


# --- a folder of shard files -------------------------------------------------------------

_NPY_NAME = re.compile(r"^(?P<shard>.+)\.(?P<array>[^.]+)\.npy$")


def write_shards(folder: str | Path, arrays: Mapping[str, np.ndarray], rows_per_shard: int,
                 fmt: str = "npy") -> Path:
    """Write `arrays` to `folder` as shard files of `rows_per_shard` rows, plus a manifest.

    `fmt="npy"` writes `shard-00000.NAME.npy` per array; `fmt="npz"` writes one uncompressed
    `shard-00000.npz` per shard. `NpyFolderSource` reads either a row at a time.
    """
    size = validate_arrays(arrays)
    if rows_per_shard < 1:
        raise UserError(f"rows_per_shard={rows_per_shard} must be >= 1")
    if fmt not in ("npy", "npz"):
        raise UserError(f"fmt={fmt!r} is unknown; use 'npy' or 'npz'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, size, rows_per_shard)):
        part = {name: np.asarray(a)[start:start + rows_per_shard] for name, a in arrays.items()}
        stem = f"shard-{number:05d}"
        if fmt == "npz":
            np.savez(folder / f"{stem}.npz", **part)
        else:
            for name, a in part.items():
                np.save(folder / f"{stem}.{name}.npy", a, allow_pickle=False)
        shards.append({"name": stem, "rows": len(next(iter(part.values())))})
    manifest = {
        "format": fmt,
        "arrays": {name: {"dtype": np.asarray(a).dtype.str, "shape": list(np.shape(a)[1:])}
                   for name, a in arrays.items()},
        "shards": shards,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


# --- reading shard files through os.pread, never a memory map ----------------------------

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

    def __del__(self, close: Callable[[int], None] = os.close) -> None:
        """Close the descriptor (`os.close` bound here: at exit, module globals are gone)."""
        fd = getattr(self, "fd", None)
        if fd is not None:
            close(fd)

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


def _open_npy(path: Path) -> ShardArray:
    """The array of one `.npy` shard file: its header read now, its rows when served."""
    return _array_at(ShardFile(path), 0, str(path))


def _open_npz(path: Path) -> dict[str, ShardArray]:
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


# --- the manifest ---------------------------------------------------------------------

MANIFEST_SHAPE = {"format": str,
                  "arrays": Each({"dtype": str, "shape": ListOf(int)}),
                  "shards": ListOf({"name": str, "rows": int})}
MANIFEST_FIX = (f"rewrite the folder with jaxdist.data.write_shards, or delete its {MANIFEST} "
                f"to find the shards by their file names")


def _damaged(path: Path, key: str, wanted: str, value: Any) -> UserError:
    """The one-line error for a manifest whose `key` holds `value` where `wanted` belongs."""
    return UserError(f"{path} is damaged: its {key} should be {wanted}, not "
                     f"{describe_value(value)}; {MANIFEST_FIX}")


def _is_file_name(name: str) -> bool:
    """Whether `name` can be part of a file's name in the folder (no folder, no NUL)."""
    return bool(name) and name not in (".", "..") and not set(name) & {"/", "\\", "\0"}


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest at `path`, its shape and values checked: one line naming the key if not."""
    manifest = load_json(path, MANIFEST_SHAPE, MANIFEST_FIX)
    if manifest["format"] not in ("npy", "npz"):
        raise _damaged(path, "format", "'npy' or 'npz'", manifest["format"])
    for name, spec in manifest["arrays"].items():
        if not _is_file_name(name):
            raise _damaged(path, f"arrays.{name}", "a file name in the folder", name)
        try:
            np.dtype(spec["dtype"])
        except (TypeError, ValueError):
            raise _damaged(path, f"arrays.{name}.dtype", "a numpy dtype",
                           spec["dtype"]) from None
    for number, shard in enumerate(manifest["shards"]):
        if not _is_file_name(shard["name"]):
            raise _damaged(path, f"shards[{number}].name", "a file name in the folder",
                           shard["name"])
    return manifest


def _discover(folder: Path) -> list[tuple[str, dict[str, ShardArray]]]:
    """Open every shard in `folder` (by manifest when there is one, else by file name)."""
    manifest_path = folder / MANIFEST
    manifest = _read_manifest(manifest_path) if manifest_path.exists() else None
    if manifest is not None:
        fmt, names = manifest["format"], list(manifest["arrays"])
        stems = [s["name"] for s in manifest["shards"]]
    else:
        npz = sorted(folder.glob("*.npz"))
        fmt = "npz" if npz else "npy"
        stems = ([p.stem for p in npz] if npz else
                 sorted({m["shard"] for p in folder.glob("*.npy")
                         if (m := _NPY_NAME.match(p.name))}))
        names = None
    shards = []
    for stem in stems:
        if fmt == "npz":
            arrays = _open_npz(_existing(folder / f"{stem}.npz"))
        else:
            expected = names or sorted(m["array"] for p in folder.glob(f"{stem}.*.npy")
                                       if (m := _NPY_NAME.match(p.name)))
            arrays = {name: _open_npy(_existing(folder / f"{stem}.{name}.npy"))
                      for name in expected}
        shards.append((stem, arrays))
    if manifest is not None:
        _check_against_manifest(folder, shards, manifest)
    return shards


def _existing(path: Path) -> Path:
    """`path`, refused in one line if it is missing."""
    if not path.exists():
        raise UserError(f"shard file {path} is missing; restore it or rewrite the folder "
                        f"with write_shards")
    return path


def _check_against_manifest(folder: Path, shards: list, manifest: dict) -> None:
    """Refuse a shard whose arrays differ from what the manifest says they are.

    Dtypes are compared by their short form (`dtype.str`), which is what the manifest
    holds: for a structured array that is its size only, its fields are in its header.
    """
    for (stem, arrays), entry in zip(shards, manifest["shards"], strict=True):
        for name, spec in manifest["arrays"].items():
            if name not in arrays:
                raise UserError(f"shard {folder / stem} lacks array {name!r}; rewrite the "
                                f"folder with write_shards")
            a = arrays[name]
            want = (entry["rows"], *spec["shape"])
            if a.shape != want or a.dtype.str != np.dtype(spec["dtype"]).str:
                raise UserError(f"shard {folder / stem} array {name!r} is {a.dtype}{a.shape}, "
                                f"the manifest says {np.dtype(spec['dtype'])}{want}; the "
                                f"file is damaged or foreign, rewrite the folder")


class NpyFolderSource:
    """A folder of `.npy`/`.npz` shard files: each opened once, only the rows served read.

    Rows are read with `os.pread` from descriptors opened here, never through a memory
    map: a shard truncated (or rewritten shorter) while training is then one `UserError`
    naming it, at the next batch that touches it, where a memory map would kill the process
    with SIGBUS. Each batch checks the size of the files it reads (one `fstat` each).
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"data folder {folder} does not exist; give the folder written "
                            f"by jaxdist.data.write_shards")
        shards = _discover(folder)
        if not shards:
            raise UserError(f"data folder {folder} holds no .npy/.npz shard files")
        first_stem, first = shards[0]
        for stem, arrays in shards:
            if sorted(arrays) != sorted(first):
                raise UserError(f"shard {folder / stem} has arrays {sorted(arrays)}, "
                                f"{first_stem} has {sorted(first)}; every shard needs the same")
            validate_arrays(arrays, f"shard {folder / stem}")
            for name, a in arrays.items():
                ref = first[name]
                if a.shape[1:] != ref.shape[1:] or a.dtype != ref.dtype:
                    raise UserError(f"shard {folder / stem} array {name!r} is "
                                    f"{a.dtype}{a.shape[1:]} per row, {first_stem} has "
                                    f"{ref.dtype}{ref.shape[1:]}; every shard must match")
        self.folder = folder
        self.shards = [arrays for _, arrays in shards]
        self.files = [list(dict.fromkeys(a.file for a in arrays.values()))
                      for arrays in self.shards]
        rows = np.array([len(next(iter(a.values()))) for a in self.shards])
        self.starts = np.concatenate([[0], np.cumsum(rows)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def column(self, name: str) -> np.ndarray:
        """All rows of one array, read whole from every shard (each file's size checked)."""
        _column(self.shards[0], name)
        for files in self.files:
            for file in files:
                file.check_size()
        return np.concatenate([shard[name].read_all() for shard in self.shards])

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Read the rows at `indices`, after checking that their shards have not shrunk."""
        indices = np.asarray(indices, np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row indices must lie in [0, {len(self)}); got "
                             f"{indices.min()} to {indices.max()}")
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        first = self.shards[0]
        out = {name: np.empty((len(indices), *a.shape[1:]), a.dtype)
               for name, a in first.items()}
        for shard in np.unique(shard_of):
            for file in self.files[shard]:
                file.check_size()
            where = np.nonzero(shard_of == shard)[0]
            local = indices[where] - self.starts[shard]
            for name, a in self.shards[shard].items():
                out[name][where] = a.read_rows(local)
        return out
