"""What makes a checkpoint folder trustworthy, and what keeps a save being written safe.

- `meta.json`'s shapes (`STATE_META_SHAPE`, `RUN_META_SHAPE`), and `tree_signature`: the
  dtype and shape of every leaf, which a restore's target must match (`check_fits`), as
  the restored state must hold the checkpoint's step (`check_state_step`).
- `manifest.json`: the sha256 of every other file, written by `write_meta_and_manifest`
  and checked by `check_manifest` (a file altered, truncated, missing or added is refused).
- `InProgress`: the lock beside a save's temporary folder while it is written, so that the
  cleaning at a run's start never removes the folder of a save another process is writing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdist.base.errors import UserError
from jaxdist.base.files import write_text_atomically
from jaxdist.base.pytree import PyTree
from jaxdist.base.schema import Each, check, load_json
from jaxdist.parallel.backend import leaf_dtype

FORMAT = "jaxdist-checkpoint-1"
MANIFEST = "manifest.json"
META = "meta.json"

NUMBER_OR_NULL = (float, None)
MANIFEST_SHAPE = {"format": str, "files": Each(str)}
# What a resumed run reads of meta.json (a tool restoring the state needs only the first
# four; `RunState.meta` writes the rest).
STATE_META_SHAPE = {"format": str, "step": int, "signature": Each(str), "split": Each(int)}
RUN_META_SHAPE = {
    **STATE_META_SHAPE,
    "config": dict, "identity": dict, "devices": int, "stop_reason": str,
    "loader": {"epoch": int, "index": int},
    "window": {"totals": Each(float), "steps": int},
    "early_stopping": {"best": NUMBER_OR_NULL, "best_step": (int, None),
                       "bad_evaluations": int},
    "nonfinite": {"run": int},
    "eval": (None, Each(NUMBER_OR_NULL)),
}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(folder: Path) -> list[Path]:
    """Every file under `folder` that its manifest lists (all but the manifest), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def tree_signature(tree: PyTree) -> dict[str, str]:
    """`{path: "dtype[shape]"}` for every leaf: what must match for a restore to fit."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): f"{leaf_dtype(leaf)}{list(np.shape(leaf))}"
            for path, leaf in leaves}


def write_meta_and_manifest(folder: Path, meta: dict[str, Any]) -> None:
    """Add meta.json and the manifest of every file to the written state in `folder`."""
    (folder / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    manifest = {"format": FORMAT,
                "files": {str(p.relative_to(folder)): sha256_file(p)
                          for p in checkpoint_files(folder)}}
    write_text_atomically(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True)
                          + "\n")


def check_manifest(folder: Path, fix: str) -> None:
    """Refuse, in one line ending in `fix`, a checkpoint `folder` its manifest does not fit.

    The manifest must be a jaxdist one and list exactly the files there, each with its sha256.
    """
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"checkpoint {folder} has no readable {MANIFEST}: it is damaged "
                        f"or not a jaxdist checkpoint; {fix}")
    manifest = load_json(manifest_path, dict, fix, f"checkpoint {folder}'s {MANIFEST}")
    if manifest.get("format") != FORMAT:
        raise UserError(f"checkpoint {folder} is not a {FORMAT} checkpoint; {fix}")
    listed = check(manifest, MANIFEST_SHAPE, f"checkpoint {folder}'s {MANIFEST}", fix)["files"]
    present = {str(p.relative_to(folder)): p for p in checkpoint_files(folder)}
    for name in sorted(set(listed) | set(present)):
        if name not in present:
            raise UserError(f"checkpoint {folder} lacks its file {name}; {fix}")
        if name not in listed:
            raise UserError(f"checkpoint {folder} holds a file its manifest does not list "
                            f"({name}); {fix}")
        if sha256_file(present[name]) != listed[name]:
            raise UserError(f"checkpoint {folder} file {name} does not match its sha256 "
                            f"(altered or truncated); {fix}")


def check_fits(where: Path, target: PyTree, meta: dict[str, Any]) -> dict[str, int]:
    """Refuse checkpoint `where` (its `meta`) if it does not fit `target`; return its split.

    Every leaf of `target` must have the dtype and shape `meta`'s signature gives, and the
    leaves `meta` names as split over the devices (`{path: devices}`) must be among them.
    """
    want, have = tree_signature(target), meta["signature"]
    if want != have:
        differences = [f"{key}: {have.get(key, 'absent')} there, {want.get(key, 'absent')} "
                       f"now" for key in sorted(set(want) | set(have))
                       if want.get(key) != have.get(key)]
        raise UserError(f"checkpoint {where} does not fit this model/optimizer "
                        f"({'; '.join(differences[:3])}"
                        f"{'; ...' if len(differences) > 3 else ''}); use the config it was "
                        f"saved with, or a new --workdir")
    split = meta.get("split") or {}
    odd = [key for key, devices in split.items()
           if key not in have or not isinstance(devices, int) or devices < 1]
    if odd:
        raise UserError(f"checkpoint {where} names split leaves that its state does not "
                        f"hold ({odd[0]}): its meta.json is damaged; delete {where} to "
                        f"resume from the checkpoint before it, or start a new --workdir")
    return split


def check_state_step(where: Path, state: PyTree, step: int) -> None:
    """Refuse the restored `state` of checkpoint `where` if it holds a step other than `step`."""
    held = _state_step(state)
    if held is not None and held != step:
        raise UserError(f"checkpoint {where} says step {step} in its name and meta.json, "
                        f"but its state is at step {held}: it was altered; delete {where} "
                        f"to resume from the checkpoint before it, or start a new --workdir")


def _state_step(state: PyTree) -> int | None:
    """The step a restored state holds (a TrainState's `step`, or a `"step"` entry)."""
    step = state.get("step") if isinstance(state, dict) else getattr(state, "step", None)
    if step is None or np.ndim(step) != 0:
        return None
    return int(np.asarray(step))


class InProgress:
    """A lock held on `tmp-NAME.lock` beside a save's `tmp-NAME` folder while it is written.

    The cleaning at a run's start removes only temporary folders whose lock nobody holds,
    so it never removes the folder of a save another live process is writing.
    """

    def __init__(self, tmp: Path):
        self.path = tmp.with_name(tmp.name + ".lock")
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    @staticmethod
    def held_by_another(tmp: Path) -> bool:
        """Whether another process is writing the temporary folder `tmp` now."""
        try:
            fd = os.open(tmp.with_name(tmp.name + ".lock"), os.O_RDWR)
        except OSError:
            return False
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file, then let go of the lock."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None

