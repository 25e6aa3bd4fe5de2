"""Random-access data sources: a length, and rows by index as a dict of numpy arrays.

- `ArraySource`: in-memory arrays.
- `NpyFolderSource`: a folder of `.npy`/`.npz` shard files, memory-mapped, never loaded
  whole; `write_shards` writes one.
- `MapSource`: anything with `__len__` and `__getitem__(i) -> dict` (a grain `MapDataset`,
  an ArrayRecord source wrapped to decode records, a Hugging Face `datasets.Dataset` with
  `.with_format("numpy")`); one with `__getitems__(list)` is read a batch at a time.

Every source offers `get_batch(indices) -> dict[name, array[len(indices), ...]]`.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from jaxdist.errors import UserError

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
    `shard-00000.npz` per shard. Both are memory-mapped by `NpyFolderSource`.
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


def _memmap_npz_member(path: Path, member: str) -> np.ndarray:
    """Memory-map one array stored uncompressed inside an `.npz` file."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            raise UserError(f"{path} is compressed and cannot be memory-mapped; write it with "
                            f"numpy.savez (not savez_compressed) or jaxdist write_shards")
    with path.open("rb") as f:
        f.seek(info.header_offset)
        local_header = f.read(30)
        name_length = int.from_bytes(local_header[26:28], "little")
        extra_length = int.from_bytes(local_header[28:30], "little")
        f.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise UserError(f"{path}:{member} holds Python objects; only plain arrays are allowed")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                     order="F" if fortran else "C")


def _open_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        raise UserError(f"{path} cannot be memory-mapped ({error}); shards must hold plain "
                        f"numeric arrays") from None


def _discover(folder: Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Open every shard in `folder` (by manifest when there is one, else by file name)."""
    manifest_path = folder / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
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
            path = folder / f"{stem}.npz"
            if not path.exists():
                raise UserError(f"shard file {path} is missing; restore it or rewrite the "
                                f"folder with write_shards")
            with zipfile.ZipFile(path) as archive:
                members = [m[:-4] for m in archive.namelist() if m.endswith(".npy")]
            arrays = {name: _memmap_npz_member(path, name + ".npy") for name in members}
        else:
            expected = names or sorted(m["array"] for p in folder.glob(f"{stem}.*.npy")
                                       if (m := _NPY_NAME.match(p.name)))
            arrays = {}
            for name in expected:
                path = folder / f"{stem}.{name}.npy"
                if not path.exists():
                    raise UserError(f"shard file {path} is missing; restore it or rewrite "
                                    f"the folder with write_shards")
                arrays[name] = _open_npy(path)
        shards.append((stem, arrays))
    if manifest_path.exists():
        _check_against_manifest(folder, shards, manifest)
    return shards


def _check_against_manifest(folder: Path, shards: list, manifest: dict) -> None:
    for (stem, arrays), entry in zip(shards, manifest["shards"], strict=True):
        for name, spec in manifest["arrays"].items():
            if name not in arrays:
                raise UserError(f"shard {folder / stem} lacks array {name!r}; rewrite the "
                                f"folder with write_shards")
            a = arrays[name]
            want = (entry["rows"], *spec["shape"])
            if a.shape != want or a.dtype != np.dtype(spec["dtype"]):
                raise UserError(f"shard {folder / stem} array {name!r} is {a.dtype}{a.shape}, "
                                f"the manifest says {np.dtype(spec['dtype'])}{want}; the "
                                f"file is damaged or foreign, rewrite the folder")


class NpyFolderSource:
    """A folder of `.npy`/`.npz` shard files, memory-mapped: only rows served are read."""

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
        rows = np.array([len(next(iter(a.values()))) for a in self.shards])
        self.starts = np.concatenate([[0], np.cumsum(rows)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def column(self, name: str) -> np.ndarray:
        """All rows of one array, read from every shard."""
        return np.concatenate([_column(shard, name) for shard in self.shards])

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Read the rows at `indices`, touching only their pages of the shard files."""
        indices = np.asarray(indices, np.int64)
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        first = self.shards[0]
        out = {name: np.empty((len(indices), *a.shape[1:]), a.dtype)
               for name, a in first.items()}
        for shard in np.unique(shard_of):
            where = np.nonzero(shard_of == shard)[0]
            local = indices[where] - self.starts[shard]
            for name, a in self.shards[shard].items():
                out[name][where] = a[local]
        return out
