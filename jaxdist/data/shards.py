"""A folder of shard files: `write_shards` writes one, `NpyFolderSource` serves its rows.

The folder holds `.npy` files (one per array and shard) or `.npz` files (one per shard),
and a `manifest.json` that lists the shards and their arrays; without one, the shards are
found by their file names. Rows are read through `jaxdist.data.shard_files`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxdist.base.errors import UserError, at_least
from jaxdist.base.schema import Each, ListOf, describe_value, load_json
from jaxdist.data.shard_files import ShardArray, open_npy, open_npz
from jaxdist.data.sources import _column, validate_arrays

MANIFEST = "manifest.json"

_NPY_NAME = re.compile(r"^(?P<shard>.+)\.(?P<array>[^.]+)\.npy$")


def write_shards(folder: str | Path, arrays: Mapping[str, np.ndarray], rows_per_shard: int,
                 fmt: str = "npy") -> Path:
    """Write `arrays` to `folder` as shard files of `rows_per_shard` rows, plus a manifest.

    `fmt="npy"` writes `shard-00000.NAME.npy` per array; `fmt="npz"` writes one uncompressed
    `shard-00000.npz` per shard. `NpyFolderSource` reads either a row at a time.
    """
    size = validate_arrays(arrays)
    if rows_per_shard < 1:
        raise UserError(at_least(f"rows_per_shard={rows_per_shard}", 1))
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
            arrays = open_npz(_existing(folder / f"{stem}.npz"))
        else:
            expected = names or sorted(m["array"] for p in folder.glob(f"{stem}.*.npy")
                                       if (m := _NPY_NAME.match(p.name)))
            arrays = {name: open_npy(_existing(folder / f"{stem}.{name}.npy"))
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
