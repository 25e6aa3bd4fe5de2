"""A run's workdir: it must be a writable folder, and it belongs to one run at a time.

`WorkdirLock` holds an exclusive lock on `WORKDIR/lock` for the run's lifetime: a second
run started on the same workdir, on this host or another, is refused with one line that
names the holder. The lock is a POSIX record lock (`fcntl.lockf`): the kernel drops it when
the holding process dies, SIGKILL included, and NFS supports it (NFSv4, or NFSv3 with its
lock daemon `lockd` running, which is the default on Linux clients and servers).

`WORKDIR/saved.json` remembers the newest checkpoint ever committed there, so a workdir
whose checkpoints were removed is told apart from one whose run never saved: its log is
then not silently shortened.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import shutil
import socket
import time
from pathlib import Path

from jaxdist.errors import UserError
from jaxdist.files import write_text_atomically
from jaxdist.records import read_records
from jaxdist.schema import load_json

LOCK = "lock"
SAVED = "saved.json"
# What --restart removes: everything a run (and its tools) write, each recognised by its
# content or the names inside it, so that a file jaxdist did not write is never removed.
RUN_FILES = ("metrics.jsonl", "config.json", SAVED)
RUN_FOLDERS = {  # a folder: the patterns of the names directly inside it
    "checkpoints": ("step_*", "tmp-*", "trash-*"),
    "tensorboard": ("events.out.tfevents.*",),
    "plots": ("*.png",),
    "explain": ("attributions.npz", "attributions.png"),
}


def prepare_workdir(path: Path) -> Path:
    """Create `path` if needed and check that it is a writable folder (one line if not)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"--workdir {path} is a file, not a folder; give a folder") from None
    except NotADirectoryError:
        raise UserError(f"--workdir {path}: a part of that path is a file, not a folder; "
                        f"give a folder") from None
    except OSError as error:
        raise UserError(f"--workdir {path} cannot be created ({error.strerror}); give a "
                        f"folder you can write to") from None
    if not path.is_dir():
        raise UserError(f"--workdir {path} is not a folder; give a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--workdir {path} is not writable; give a folder you can write to")
    return path


class WorkdirLock:
    """An exclusive lock on a workdir for as long as a run uses it (a context manager)."""

    _held: set[str] = set()  # POSIX locks do not conflict within one process: this does

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or refuse with one line naming the run that holds it."""
        key = str(self.path.resolve())
        if key in self._held:
            raise UserError(f"--workdir {self.path.parent} is in use by another run in this "
                            f"process (pid {os.getpid()}); let it finish or use another "
                            f"--workdir")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another run"
            os.close(fd)
            raise UserError(f"--workdir {self.path.parent} is in use by {holder}; wait for "
                            f"it to end or stop it, or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid {os.getpid()} on host {socket.gethostname()} since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        self._held.add(key)

    def release(self) -> None:
        """Give the lock up (closing the file releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._held.discard(str(self.path.resolve()))

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def restart(workdir: Path) -> list[str]:
    """Remove what an earlier run wrote in `workdir` (hold its lock first); return what.

    Each file and folder is first recognised as a run's own (a config.json or log of the
    form jaxdist writes, a folder holding only the names a run puts there); if any is not,
    nothing is removed and the restart is refused in one line naming it.
    """
    workdir = Path(workdir)
    found = [name for name in (*RUN_FILES, *RUN_FOLDERS)
             if (workdir / name).exists() or (workdir / name).is_symlink()]
    for name in found:
        why = _not_a_run_file(workdir / name)
        if why is not None:
            raise UserError(f"--restart removes only what a jaxdist run wrote, and "
                            f"{workdir / name} {why}; move it away yourself, or use another "
                            f"--workdir")
    removed = []
    for name in found:
        target = workdir / name
        if name in RUN_FOLDERS:
            count = sum(1 for _ in target.iterdir())
            shutil.rmtree(target)
            removed.append(f"{name}/ ({count} {'entry' if count == 1 else 'entries'})")
        else:
            target.unlink()
            removed.append(name)
    return removed


def _not_a_run_file(path: Path) -> str | None:
    """Why `path` is not a file or folder that a run wrote (None when it is one)."""
    if path.is_symlink():
        return f"is a symbolic link (to {os.readlink(path)}), which no run makes"
    if path.name in RUN_FOLDERS:
        if not path.is_dir():
            return "is not a folder"
        patterns = RUN_FOLDERS[path.name]
        for entry in sorted(path.iterdir()):
            if entry.is_symlink() or not any(fnmatch.fnmatch(entry.name, p) for p in patterns):
                return f"holds {entry.name}, which no run writes there"
        return None
    if not path.is_file():
        return "is not a file"
    try:
        if path.name == "metrics.jsonl":
            read_records(path, "")
        elif path.name == "config.json":
            load_json(path, {"train": dict, "optimizer": dict, "parallel": dict}, "")
        else:
            load_json(path, {"newest_checkpoint": int}, "")
    except UserError:
        return "does not hold what a jaxdist run writes there"
    return None


def newest_saved_step(workdir: Path) -> int | None:
    """The step of the newest checkpoint ever committed in `workdir`, if any."""
    path = Path(workdir) / SAVED
    try:
        return int(json.loads(path.read_text())["newest_checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_saved_step(workdir: Path, step: int) -> None:
    """Remember that a checkpoint of `step` was committed in `workdir`."""
    write_text_atomically(Path(workdir) / SAVED,
                          json.dumps({"newest_checkpoint": step}) + "\n")
