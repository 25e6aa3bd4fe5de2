"""Checkpoints: orbax-written state, atomic by rename, verified by sha256 on restore.

Layout of `WORKDIR/checkpoints/`:

    step_00001000/            a complete checkpoint (listed and restorable)
        state/                the TrainState pytree, written by orbax
        meta.json             step, loader position, config, loop state, eval metrics
        manifest.json         sha256 of every other file
    tmp-step_00002000-.../    a save in progress: never listed, removed at the next start
    tmp-step_00002000-....lock  locked while that save is written (never removed then)
    trash-step_.../           a checkpoint being deleted: never listed

A save writes everything into a `tmp-` folder and renames it to `step_...` only when
complete, so a process killed at any moment leaves either the new checkpoint whole or no
trace of it. Deletion renames first, for the same reason. Restore checks the manifest and
refuses, with a one-line error, a checkpoint whose files were altered, truncated or added.

A state split over the devices (`parallel.shard`) is saved as it lies, each process writing
its own devices' chunks, and read back in the chunks a new run wants: `jaxdist.checkpoints.split`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxdist.base import disk
from jaxdist.base.errors import UserError
from jaxdist.base.pytree import PyTree
from jaxdist.base.schema import load_json
from jaxdist.checkpoints.integrity import (
    FORMAT,
    META,
    STATE_META_SHAPE,
    InProgress,
    check_fits,
    check_manifest,
    check_state_step,
    tree_signature,
    write_meta_and_manifest,
)
from jaxdist.checkpoints.orbax_quiet import quiet_orbax_errors
from jaxdist.checkpoints.split import as_asked, as_saved, joint_checkpointer
from jaxdist.parallel.backend import leaf_dtype
from jaxdist.parallel.processes import barrier, timed_out, waited_too_long

PREFIX = "step_"
_UNSCANNED = object()


def _nbytes(tree: PyTree) -> int:
    """The bytes of every leaf of `tree` (global arrays counted whole, nothing copied)."""
    return sum(math.prod(np.shape(x)) * leaf_dtype(x).itemsize for x in jax.tree.leaves(tree))


class PendingSave:
    """A checkpoint whose state orbax is writing; `commit()` finishes and publishes it."""

    def __init__(self, store: CheckpointStore, final: Path, tmp: Path | None = None,
                 meta: dict[str, Any] | None = None, checkpointer: Any = None, size: int = 0,
                 mark: InProgress | None = None):
        self.store, self.final, self.tmp, self.meta = store, final, tmp, meta
        self.checkpointer, self.size, self.mark = checkpointer, size, mark

    def commit(self) -> Path:
        """Wait for the state's files, add meta and manifest, rename into place (the writer)."""
        store, tmp = self.store, self.tmp
        if tmp is None:
            return self.final
        try:
            with store._failures_of(self.final, tmp, self.size):
                self.checkpointer.wait_until_finished()
                if store.writer:
                    write_meta_and_manifest(tmp, self.meta)
            if store.writer:
                store._publish(tmp, self.final)
        finally:
            if self.mark is not None:
                self.mark.release()
        return self.final


class CheckpointStore:
    """The checkpoints of one workdir: save, list, verify, restore, prune."""

    def __init__(self, folder: Path, keep: int = 3, best_metric: str = "",
                 best_mode: str = "min", writer: bool = True):
        quiet_orbax_errors()
        self.folder = Path(folder).absolute()  # orbax requires absolute paths
        self.keep, self.best_metric, self.best_mode = keep, best_metric, best_mode
        # The state is replicated, so in a multi-process run one process (the writer)
        # saves it and every process reads it back; each works with orbax on its own.
        self.writer = writer
        self._best: Any = _UNSCANNED
        me = jax.process_index()
        # Each process alone: the writer's saves of host state, and every restore.
        self._checkpointer = ocp.StandardCheckpointer(
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}))
        # All processes together: saves of a state split over every process's devices.
        self._everyone: ocp.StandardCheckpointer | None = None
        self._joint_saves = 0

    def clean_incomplete(self) -> None:
        """Remove what interrupted saves and deletions left behind (the writer only)."""
        if self.writer and self.folder.exists():
            for leftover in self.folder.glob("tmp-*"):
                name = leftover.name.removesuffix(".lock")
                if not InProgress.held_by_another(leftover.with_name(name)):
                    shutil.rmtree(leftover, ignore_errors=True)
                    with contextlib.suppress(OSError):
                        leftover.unlink()
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
        return self.begin(step, state, meta, replace).commit()

    def begin(self, step: int, state: PyTree, meta: dict[str, Any], replace: bool = False,
              logical: PyTree = None, split: dict[str, int] | None = None) -> PendingSave:
        """Start saving the checkpoint of `step`, as `save` does; `commit()` the result.

        Returns once the state is copied off the devices (orbax writes the files in the
        background), so the caller may then reuse the state's buffers. `split` names the
        leaves of `state` that are global arrays split over the devices (`{path: devices}`),
        `logical` gives every leaf's own shape (for the signature). With split leaves in a
        multi-process run every process must call this: each writes its own chunks.
        """
        final = self.path(step)
        self.remember(step, meta)
        split = split or {}
        jointly = bool(split) and jax.process_count() > 1
        if (final.exists() and not replace) or not (self.writer or jointly):
            return PendingSave(self, final)
        size = _nbytes(state)
        if self.writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            # Checked first, because orbax reports a failed write from several threads at once.
            cause = disk.lacking_room(self.folder, size)
            if cause is not None:
                raise self._refuse(final, size, cause)
        if jointly:  # a name every process knows
            self._joint_saves += 1
            tmp = self.folder / f"tmp-{final.name}-joint{self._joint_saves}"
            if self._everyone is None:
                self._everyone = joint_checkpointer()
            # Every process is at this save before orbax's own barriers, within our timeout.
            barrier(f"save-{step}")
            checkpointer = self._everyone
        else:
            tmp = self.folder / f"tmp-{final.name}-{os.getpid()}-{time.time_ns()}"
            checkpointer = self._checkpointer
        meta = {"format": FORMAT, "step": step,
                "signature": tree_signature(state if logical is None else logical),
                "split": dict(sorted(split.items())), **meta}
        mark = None
        try:
            with self._failures_of(final, tmp, size):
                mark = InProgress(tmp) if self.writer else None
                tmp.mkdir(parents=True, exist_ok=True)
                checkpointer.save(tmp / "state", state)
        except BaseException:
            if mark is not None:
                mark.release()
            raise
        return PendingSave(self, final, tmp, meta, checkpointer, size, mark)

    @contextlib.contextmanager
    def _failures_of(self, final: Path, tmp: Path, size: int) -> Iterator[None]:
        """A write that fails leaves no `tmp`; a full disk or a limit becomes one line."""
        try:
            yield
        except Exception as error:
            if self.writer:
                shutil.rmtree(tmp, ignore_errors=True)
            if timed_out(error):  # orbax's barrier in a save split over the processes
                raise UserError(waited_too_long(f"the save of {final.name}")) from None
            cause = disk.disk_error(error)
            if cause is None:
                raise
            raise self._refuse(final, size, cause) from None

    def _refuse(self, final: Path, size: int, cause: str) -> UserError:
        """The one-line error of a checkpoint that could not be written."""
        previous = [s for s in self.steps() if self.path(s) != final]
        kept = (f"the previous checkpoint {self.path(previous[-1])} is intact" if previous
                else "no earlier checkpoint exists")
        return UserError(f"could not write checkpoint {final} ({cause}; it needs about "
                         f"{size / 2**20:.1f} MB); {kept}. Free space (or raise the "
                         f"limit) and rerun to resume")

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the complete `tmp` to `final` (replacing one there), then prune."""
        if final.exists():
            trash = self.folder / f"trash-{final.name}-{time.time_ns()}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        disk.fsync_dir(self.folder)
        self._prune()

    def remember(self, step: int, meta: dict[str, Any]) -> None:
        """Count the checkpoint of `step` (about to be saved) in the choice of the best one."""
        score = self._score(meta.get("eval"))
        best = self._best_known()
        if score is not None and (best is None or score < best[0]):
            self._best = (score, step)

    def verify(self, step: int, shape: Any = STATE_META_SHAPE) -> dict[str, Any]:
        """Check the manifest of checkpoint `step` and return its meta; refuse a bad one.

        The meta must have `shape` (`RUN_META_SHAPE` for a run that resumes from it) and
        hold the step the folder's name says: a renamed checkpoint is refused.
        """
        folder = self.path(step)
        fix = (f"delete {folder} to resume from the checkpoint before it, or start a new "
               f"--workdir")
        check_manifest(folder, fix)
        meta = load_json(folder / META, shape, fix, f"checkpoint {folder}'s {META}")
        if meta["step"] != step:
            raise UserError(f"checkpoint {folder} holds step {meta['step']}, not the step its "
                            f"name says: the folder was renamed. Rename it back to "
                            f"{PREFIX}{meta['step']:08d}, or {fix}")
        return meta

    def restore(self, step: int, target: PyTree, meta: dict[str, Any] | None = None,
                placed: PyTree = None) -> tuple[PyTree, dict[str, Any]]:
        """Check checkpoint `step` fits `target` (logical host state), return (state, meta).

        Pass the `meta` that `verify(step)` returned to skip verifying a second time.
        `placed` (a tree like `target`) gives, for a leaf the run keeps split over the
        devices, the global array it wants (a `jax.ShapeDtypeStruct` with its sharding),
        and None for the others: a leaf the checkpoint holds split comes back in the chunks
        `placed` asks for, or whole in its logical shape; a leaf it holds whole comes back
        whole (numpy) for the caller to split.
        """
        meta = self.verify(step) if meta is None else meta
        where = self.path(step)
        split = check_fits(where, target, meta)
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(target)
        wanted = [None] * len(with_paths) if placed is None else treedef.flatten_up_to(placed)
        keys = [jax.tree_util.keystr(path) for path, _ in with_paths]
        asked = [as_saved(key, leaf, split, want)
                 for key, (_, leaf), want in zip(keys, with_paths, wanted, strict=True)]
        try:
            restored = self._checkpointer.restore(where / "state", treedef.unflatten(asked),
                                                  strict=not split)
        except Exception as error:  # the files verified: meta.json and the state disagree
            last = (str(error).strip().splitlines() or [type(error).__name__])[-1][:200]
            raise UserError(f"checkpoint {where}'s state does not match its meta.json "
                            f"({last}); delete {where} to resume from the checkpoint before "
                            f"it, or start a new --workdir") from None
        leaves = [as_asked(key, leaf, got, split, want) for key, (_, leaf), got, want
                  in zip(keys, with_paths, treedef.flatten_up_to(restored), wanted,
                         strict=True)]
        for key, (_, leaf), got, want in zip(keys, with_paths, leaves, wanted, strict=True):
            expected = want.shape if key in split and want is not None else np.shape(leaf)
            if np.shape(got) != tuple(expected):
                raise UserError(f"checkpoint {where}'s state does not match its meta.json "
                                f"({key} holds shape {list(np.shape(got))}, the meta says "
                                f"{list(expected)}); delete {where} to resume from the "
                                f"checkpoint before it, or start a new --workdir")
        state = treedef.unflatten(leaves)
        check_state_step(where, state, step)
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
        if not isinstance(value, (int, float)) or isinstance(value, bool) or np.isnan(value):
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
                except (OSError, ValueError, RecursionError):
                    continue
                if not isinstance(meta, dict) or meta.get("step") != step:
                    continue  # damaged or renamed: refused if it is ever restored
                evaluation = meta.get("eval")
                score = self._score(evaluation) if isinstance(evaluation, dict) else None
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
        if self._everyone is not None:
            self._everyone.close()
