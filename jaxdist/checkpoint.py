"""Checkpoints: orbax-written state, atomic by rename, verified by sha256 on restore.

Layout of `WORKDIR/checkpoints/`:

    step_00001000/            a complete checkpoint (listed and restorable)
        state/                the TrainState pytree, written by orbax
        meta.json             step, loader position, config, loop state, eval metrics
        manifest.json         sha256 of every other file
    tmp-step_00002000-.../    a save in progress: never listed, removed at the next start
    trash-step_.../           a checkpoint being deleted: never listed

A save writes everything into a `tmp-` folder and renames it to `step_...` only when
complete, so a process killed at any moment leaves either the new checkpoint whole or no
trace of it. Deletion renames first, for the same reason. Restore checks the manifest and
refuses, with a one-line error, a checkpoint whose files were altered, truncated or added.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxdist.errors import UserError
from jaxdist.files import write_text_atomically

PyTree = Any
FORMAT = "jaxdist-checkpoint-1"
PREFIX = "step_"
MANIFEST = "manifest.json"
META = "meta.json"
_UNSCANNED = object()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def tree_signature(tree: PyTree) -> dict[str, str]:
    """`{path: "dtype[shape]"}` for every leaf: what must match for a restore to fit."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): f"{np.asarray(leaf).dtype}{list(np.shape(leaf))}"
            for path, leaf in leaves}


class CheckpointStore:
    """The checkpoints of one workdir: save, list, verify, restore, prune."""

    def __init__(self, folder: Path, keep: int = 3, best_metric: str = "",
                 best_mode: str = "min", writer: bool = True):
        self.folder = Path(folder).absolute()  # orbax requires absolute paths
        self.keep, self.best_metric, self.best_mode = keep, best_metric, best_mode
        # The state is replicated, so in a multi-process run one process (the writer)
        # saves it and every process reads it back; each works with orbax on its own.
        self.writer = writer
        self._best: Any = _UNSCANNED
        me = jax.process_index()
        self._checkpointer = ocp.StandardCheckpointer(
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}))

    def clean_incomplete(self) -> None:
        """Remove what interrupted saves and deletions left behind (the writer only)."""
        if self.writer and self.folder.exists():
            for leftover in self.folder.glob("tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            for leftover in self.folder.glob("trash-*"):
                shutil.rmtree(leftover, ignore_errors=True)

    def path(self, step: int) -> Path:
        """Where the checkpoint of `step` lives."""
        return self.folder / f"{PREFIX}{step:08d}"

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not self.folder.exists():
            return []
        found = []
        for p in self.folder.glob(f"{PREFIX}*"):
            suffix = p.name[len(PREFIX):]
            if p.is_dir() and suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)

    def latest(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: PyTree, meta: dict[str, Any],
             replace: bool = False) -> Path:
        """Write `state` (a host pytree) and `meta` (JSON-able) as the checkpoint of `step`.

        Only the writer writes; the others just return the path. An existing checkpoint of
        `step` is kept, unless `replace`: then the new one takes its place (a crash in
        between leaves the checkpoint before it as the newest, never a mix of the two).
        A disk that is full or a file-size limit is reported in one line (`UserError`).
        """
        final = self.path(step)
        self.remember(step, meta)
        if (final.exists() and not replace) or not self.writer:
            return final
        self.folder.mkdir(parents=True, exist_ok=True)
        size = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(state))

        def refuse(cause: str) -> UserError:
            previous = [s for s in self.steps() if s != step]
            kept = (f"the previous checkpoint {self.path(previous[-1])} is intact" if previous
                    else "no earlier checkpoint exists")
            return UserError(f"could not write checkpoint {final} ({cause}; it needs about "
                             f"{size / 2**20:.1f} MB); {kept}. Free space (or raise the "
                             f"limit) and rerun to resume")

        # Checked first, because orbax reports a failed write from several threads at once.
        cause = _lacking_room(self.folder, size)
        if cause is not None:
            raise refuse(cause)
        tmp = self.folder / f"tmp-{final.name}-{os.getpid()}-{time.time_ns()}"
        try:
            self._write(tmp, step, state, meta)
        except Exception as error:
            shutil.rmtree(tmp, ignore_errors=True)
            cause = _disk_error(error)
            if cause is None:
                raise
            raise refuse(cause) from None
        if final.exists():
            trash = self.folder / f"trash-{final.name}-{time.time_ns()}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.folder)
        self._prune()
        return final

    def remember(self, step: int, meta: dict[str, Any]) -> None:
        """Count the checkpoint of `step` (about to be saved) in the choice of the best one."""
        score = self._score(meta.get("eval"))
        best = self._best_known()
        if score is not None and (best is None or score < best[0]):
            self._best = (score, step)

    def _write(self, tmp: Path, step: int, state: PyTree, meta: dict[str, Any]) -> None:
        """The checkpoint's files, complete with their manifest, in the folder `tmp`."""
        tmp.mkdir()
        self._checkpointer.save(tmp / "state", state)
        self._checkpointer.wait_until_finished()
        meta = {"format": FORMAT, "step": step, "signature": tree_signature(state), **meta}
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        manifest = {"format": FORMAT,
                    "files": {str(p.relative_to(tmp)): sha256_file(p) for p in _files(tmp)}}
        write_text_atomically(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True)
                              + "\n")

    def verify(self, step: int) -> dict[str, Any]:
        """Check the manifest of checkpoint `step` and return its meta; refuse a bad one."""
        folder = self.path(step)
        fix = (f"delete {folder} to resume from the checkpoint before it, or start a new "
               f"--workdir")
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            raise UserError(f"checkpoint {folder} has no readable {MANIFEST}: it is damaged "
                            f"or not a jaxdist checkpoint; {fix}") from None
        if manifest.get("format") != FORMAT:
            raise UserError(f"checkpoint {folder} is not a {FORMAT} checkpoint; {fix}")
        listed = manifest.get("files", {})
        present = {str(p.relative_to(folder)): p for p in _files(folder)}
        for name in sorted(set(listed) | set(present)):
            if name not in present:
                raise UserError(f"checkpoint {folder} lacks its file {name}; {fix}")
            if name not in listed:
                raise UserError(f"checkpoint {folder} holds a file its manifest does not list "
                                f"({name}); {fix}")
            if sha256_file(present[name]) != listed[name]:
                raise UserError(f"checkpoint {folder} file {name} does not match its sha256 "
                                f"(altered or truncated); {fix}")
        return json.loads((folder / META).read_text())

    def restore(self, step: int, target: PyTree,
                meta: dict[str, Any] | None = None) -> tuple[PyTree, dict[str, Any]]:
        """Check checkpoint `step` fits `target`, and return (state, meta).

        Pass the `meta` that `verify(step)` returned to skip verifying a second time.
        """
        meta = self.verify(step) if meta is None else meta
        want, have = tree_signature(target), meta["signature"]
        if want != have:
            differences = [f"{key}: {have.get(key, 'absent')} there, {want.get(key, 'absent')} "
                           f"now" for key in sorted(set(want) | set(have))
                           if want.get(key) != have.get(key)]
            raise UserError(f"checkpoint {self.path(step)} does not fit this model/optimizer "
                            f"({'; '.join(differences[:3])}"
                            f"{'; ...' if len(differences) > 3 else ''}); use the config it was "
                            f"saved with, or a new --workdir")
        state = self._checkpointer.restore(self.path(step) / "state", target)
        return state, meta

    def best_step(self) -> int | None:
        """The checkpoint with the best `best_metric`, among those that recorded it."""
        best = self._best_known()
        return None if best is None else best[1]

    def improves(self, eval_values: dict[str, float]) -> bool:
        """Whether `eval_values` beat the best checkpoint's `best_metric`."""
        value = self._score(eval_values)
        best = self._best_known()
        return value is not None and (best is None or value < best[0])

    def _score(self, eval_values: dict[str, float] | None) -> float | None:
        """The best metric of `eval_values`, negated under `max`: lower is better."""
        value = (eval_values or {}).get(self.best_metric) if self.best_metric else None
        if value is None or np.isnan(value):
            return None
        return float(value) if self.best_mode == "min" else -float(value)

    def _best_known(self) -> tuple[float, int] | None:
        # Kept in memory after one scan of the metas, and updated by save(): in a
        # multi-process run every process then decides alike, whatever the writer is
        # renaming or deleting at that moment.
        if self._best is _UNSCANNED:
            scored = []
            for step in self.steps():
                try:
                    meta = json.loads((self.path(step) / META).read_text())
                except (OSError, ValueError):
                    continue
                score = self._score(meta.get("eval"))
                if score is not None:
                    scored.append((score, step))
            self._best = min(scored) if scored else None
        return self._best

    def _prune(self) -> None:
        steps = self.steps()
        keep = set(steps[-self.keep:])
        best = self.best_step()
        if best is not None:
            keep.add(best)
        for step in steps:
            if step not in keep:
                trash = self.folder / f"trash-{self.path(step).name}-{time.time_ns()}"
                os.rename(self.path(step), trash)
                shutil.rmtree(trash, ignore_errors=True)

    def close(self) -> None:
        """Release orbax's resources."""
        self._checkpointer.close()


DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "the file-size "
               "limit was reached", errno.EDQUOT: "the disk quota was reached"}


def _lacking_room(folder: Path, size: int) -> str | None:
    """Why `size` bytes of state will not fit in `folder` (free space, file-size limit)."""
    if shutil.disk_usage(folder).free < size + (16 << 20):
        return DISK_ERRORS[errno.ENOSPC]
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < size:
        return DISK_ERRORS[errno.EFBIG]
    return None


def _disk_error(error: BaseException) -> str | None:
    """Words for a full disk, file-size limit or quota anywhere in `error`'s chain, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_ERRORS:
            return DISK_ERRORS[error.errno]
        text = str(error)
        for code, words in DISK_ERRORS.items():
            if os.strerror(code) in text:
                return words
        error = error.__cause__ or error.__context__
    return None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
