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
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

from jaxdist.base.errors import UserError
from jaxdist.base.files import write_text_atomically
from jaxdist.base.records import read_records
from jaxdist.base.schema import load_json

LOCK = "lock"
SAVED = "saved.json"
# What --restart removes: everything a run (and its tools) write, each recognised by its
# content or the names inside it, so that a file jaxdist did not write is never removed.
RUN_FILES = ("metrics.jsonl", "config.json", SAVED)
RUN_FOLDERS = {  # a folder: the patterns of the names directly inside it
    "checkpoints": ("step_*", "tmp-*", "trash-*"),
    "tensorboard": ("events.out.tfevents.*",),
    "plots": ("*.png",),  # a temporary .NAME.tmp-PID.png left by a crash too
    "explain": ("attributions.npz", "attributions.png", ".attributions.tmp-*"),
    # the tracker runs a resume continues (W&B's own folder, WORKDIR/wandb, is left alone)
    "profile": ("plugins", "process_*"),  # train.profile_steps' traces
    "tracking": ("mlflow.json", ".mlflow.json.tmp-*", "wandb.json", ".wandb.json.tmp-*"),
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
    """An exclusive lock on a workdir for as long as a run uses it (a context manager).

    Two locks, so that removing the lock file does not admit a second run: a POSIX record
    lock on `WORKDIR/lock` (it works across hosts on NFS), and a `flock` on the workdir
    folder itself, which no unlink can remove (where the file system supports it: local
    ones do; NFS's emulation refuses it on a folder, and the record lock alone is kept).
    `check()`, called at each save, notices a lock file that was removed or replaced and
    puts it back, or stops the run if another one now holds it. The lock file names its
    holder and a random `token`, which the other processes of a multi-process run read
    back to prove that they see the same folder.
    """

    _held: set[str] = set()  # POSIX locks do not conflict within one process: this does

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / LOCK
        self.token = secrets.token_hex(16)
        self._fd: int | None = None
        self._folder_fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or refuse with one line naming the run that holds it."""
        key = str(self.path.resolve())
        if key in self._held:
            raise UserError(f"--workdir {self.path.parent} is in use by another run in this "
                            f"process (pid {os.getpid()}); let it finish or use another "
                            f"--workdir")
        try:
            self._lock_folder()
            self._fd = self._lock_file()
        except BaseException:
            self.release()
            raise
        self._held.add(key)

    def _lock_folder(self) -> None:
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"--workdir {self.path.parent} is in use by {self._holder()}; "
                            f"wait for it to end or stop it, or use another "
                            f"--workdir") from None
        except OSError:  # no flock on folders here (NFS): the record lock alone
            os.close(fd)
            return
        self._folder_fd = fd

    def _lock_file(self) -> int:
        """Open, lock and fill the lock file; it must still be the file at `path` then."""
        for _ in range(3):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip()
                os.close(fd)
                raise UserError(f"--workdir {self.path.parent} is in use by "
                                f"{_holder_words(holder)}; wait for it to end or stop it, or "
                                f"use another --workdir") from None
            if self._is_locked_file(fd):
                self._write_holder(fd)
                return fd
            os.close(fd)  # replaced between the open and the lock: take the new one
        raise UserError(f"{self.path} keeps being replaced by another program; stop it, or use "
                        f"another --workdir")

    def _write_holder(self, fd: int) -> None:
        line = (f"pid {os.getpid()} on host {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')} (token {self.token})\n")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, line.encode(), 0)
            os.fsync(fd)
        except OSError as error:
            os.close(fd)
            raise UserError(f"could not write the lock file {self.path} ({error.strerror}); "
                            f"free space on that disk and rerun the same command") from None

    def _is_locked_file(self, fd: int) -> bool:
        """Whether `path` is still the file open as `fd` (not removed or replaced)."""
        try:
            here, held = os.stat(self.path), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)

    def _holder(self) -> str:
        try:
            return _holder_words(self.path.read_text(errors="replace").strip())
        except OSError:
            return _holder_words("")

    def check(self) -> None:
        """Make sure the lock file is still this run's; put it back if it was removed.

        If another run has taken a new lock file meanwhile (only possible where folders
        cannot be locked), stop with one line: two runs must never write one workdir.
        """
        if self._fd is None or self._is_locked_file(self._fd):
            return
        old, self._fd = self._fd, None
        os.close(old)
        try:
            self._fd = self._lock_file()
        except UserError as error:
            raise UserError(f"{self.path} was removed while this run held it and another run "
                            f"has locked the workdir since ({error}); this run stops without "
                            f"writing more: its newest checkpoint is intact") from None

    def release(self) -> None:
        """Give the locks up (closing the files releases them)."""
        for name in ("_fd", "_folder_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
        self._held.discard(str(self.path.resolve()))

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_token(workdir: Path) -> str | None:
    """The token in `workdir`'s lock file (written by the run holding it), or None."""
    try:
        text = (Path(workdir) / LOCK).read_text(errors="replace")
    except OSError:
        return None
    found = re.search(r"\(token ([0-9a-f]+)\)", text)
    return found.group(1) if found else None


def _holder_words(holder: str) -> str:
    """The lock file's line without its token, or words for a run that left none."""
    return re.sub(r" \(token [0-9a-f]+\)", "", holder) or "another run"


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


# Processes that must share one workdir (through JAX's coordination service).

SHARED_FILE_RETRIES = 5  # seconds to wait for a shared file system to show process 0's file


def require_same_workdir(workdir: Path | None, token: str | None) -> None:
    """Refuse (on every process) a run whose processes do not share one workdir folder.

    Process 0 holds the workdir's lock, whose file carries its random `token`; every other
    process must read that token back from its own `--workdir`. A folder that is not shared
    (each host's own disk, a different path) would let the processes train from different
    states, so it stops them all before the first step.
    """
    import jax

    from jaxdist.parallel.agreement import gather

    if jax.process_count() == 1 or workdir is None:
        return
    posted = [json.loads(a) for a in gather("workdir", json.dumps(
        {"token": token, "workdir": str(workdir)}))]
    expected = posted[0]["token"]
    seen = read_token(workdir)
    for _ in range(SHARED_FILE_RETRIES):  # a shared file system may show the file late
        if seen == expected:
            break
        time.sleep(1)
        seen = read_token(workdir)
    verdicts = [json.loads(a) for a in gather("workdir-seen", json.dumps(seen == expected))]
    for index, same in enumerate(verdicts):
        if not same:
            raise UserError(
                f"process {index} does not see the workdir that process 0 writes (process 0: "
                f"--workdir {posted[0]['workdir']}, process {index}: --workdir "
                f"{posted[index]['workdir']}, whose lock file does not hold process 0's "
                f"token); give every process the same --workdir, on a file system that all "
                f"of them share (NFS, Lustre, Filestore)")


def require_same_resume(resume: str) -> None:
    """Refuse (on every process) a run whose processes would resume different checkpoints.

    `resume` names what this process resumes (a checkpoint and its manifest's sha256) or
    says "nothing".
    """
    import jax

    from jaxdist.parallel.agreement import gather

    if jax.process_count() == 1:
        return
    answers = [json.loads(a) for a in gather("resume", json.dumps(resume))]
    for index, other in enumerate(answers[1:], start=1):
        if other != answers[0]:
            raise UserError(f"the processes would not resume from the same checkpoint: process "
                            f"0 from {answers[0]}, process {index} from {other}; give every "
                            f"process the same --workdir, on a file system that all of them "
                            f"share")
